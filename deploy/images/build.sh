#!/usr/bin/env bash
# Daemonless build of the proxy-server and proxy-agent images (no Docker engine needed).
#
#   1. A build root: a Debian rootfs (mmdebstrap, the host's apt sources and release) with
#      gcc, python3-dev and libnghttp2-dev. Our wheel is built inside it (chroot), so the
#      compiled core is compiled against that release's Python and links that release's
#      libnghttp2, the very package the runtime root gets.
#   2. A runtime root: mmdebstrap's `extract` variant with python3, libnghttp2-14 and netbase
#      only (no shell, no apt), finished by finish-root.sh (shared with the Dockerfiles): our
#      wheel and uvloop in /usr/local/lib/python3.X/dist-packages, trims, deploy/images/rootfs/
#      (the entrypoints /proxy-server and /proxy-agent: Python scripts run by the kernel's #!
#      handling, so no shell is needed; a Python `sleep` for preStop hooks such as
#      HyperShift's), byte code compiled in advance (a read-only root costs nothing).
#   3. Two images from the same single layer, committed with buildah and written as OCI
#      archives: .cache/images/proxy-server.oci.tar and .cache/images/proxy-agent.oci.tar
#      (image names localhost/konnectivity-fast/proxy-{server,agent}:$IMAGE_TAG).
#
# Runs as root (mmdebstrap's root mode, chroot). Installs its tools with apt when missing.
# The two Debian roots are cached in .cache/images/ (keyed by release and package list);
# buildah's storage is private to .cache/images/store.
#
# Environment: IMAGE_TAG (default: dev), IMAGE_SOURCE (a commit, default HEAD, or
# "worktree"; see project_tar), DEBIAN_SUITE (default: the host's release),
# PYTHON (a Python with pip, for downloading wheels; default: .venv/bin/python).
# Prints progress on stderr and the archives' paths on stdout.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
readonly ROOT
readonly OUT=$ROOT/.cache/images
readonly WORK=$OUT/work
readonly TAG=${IMAGE_TAG:-dev}
readonly REPO=localhost/konnectivity-fast
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
readonly PYTHON

# Tools this script needs, installed with apt when missing (as scripts/bootstrap.sh does).
readonly APT_TOOLS=(mmdebstrap buildah podman runc umoci skopeo)
# The build root: a compiler, the target Python's headers, nghttp2's headers.
readonly BUILD_PACKAGES=python3-dev,gcc,libc6-dev,libnghttp2-dev,pkg-config
# The runtime root: the interpreter, the shared nghttp2 our extension links, and netbase
# (/etc/services, /etc/protocols for getaddrinfo with service names).
readonly RUNTIME_PACKAGES=python3,libnghttp2-14,netbase
# The unprivileged user the images run as (Debian's nobody/nogroup).
readonly RUN_UID=65534

say() { printf '[images] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (mmdebstrap's root mode and chroot need it)"

ensure_tools() {
    local missing=() p
    for p in "${APT_TOOLS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [[ ${#missing[@]} -gt 0 ]]; then
        say "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

suite() {
    if [[ -n ${DEBIAN_SUITE:-} ]]; then echo "$DEBIAN_SUITE"; return; fi
    # shellcheck disable=SC1091
    (. /etc/os-release && echo "${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}")
}

# mmdebstrap ROOTFS_TAR PACKAGES [extra mmdebstrap args]: cached by suite, packages, args.
debian_root() {
    local tar=$1 packages=$2
    shift 2
    local key
    key=$(printf '%s\n' "$SUITE" "$packages" "$@" | sha256sum | cut -c1-16)
    if [[ -f $tar && $(cat "$tar.key" 2>/dev/null) == "$key" ]]; then
        say "cached: $(basename "$tar")"
        return
    fi
    say "mmdebstrap $SUITE: $packages"
    rm -f "$tar" "$tar.key"
    # No mirror argument: mmdebstrap uses the host's apt sources.
    nice mmdebstrap -q --format=tar --variant=extract --include="$packages" "$@" "$SUITE" "$tar.part"
    mv "$tar.part" "$tar"
    echo "$key" >"$tar.key"
}

unpack() {  # unpack TAR DIR
    rm -rf "$2"
    mkdir -p "$2"
    tar -xf "$1" -C "$2"
}

# in_root DIR [VAR=VALUE...] CMD...: run CMD as root chrooted in DIR, in private mount and
# pid namespaces (a /proc of its own, nothing mounted on the host), with a clean
# environment. The roots have no coreutils and no shell: CMD is the root's python3.
in_root() {
    local dir=$1 vars=()
    shift
    while [[ $1 == *=* ]]; do vars+=("$1"); shift; done
    mkdir -p "$dir/proc" "$dir/tmp"
    env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/tmp LANG=C.UTF-8 "${vars[@]}" \
        unshare --mount --pid --fork --mount-proc="$dir/proc" chroot "$dir" "$@"
}

pip_download() {  # pip_download DEST REQUIREMENT...: binary wheels for the images' Python
    rm -rf "$1"  # only this run's wheels: installing two versions of one package fails
    nice "$PYTHON" -m pip download -q --only-binary=:all: --implementation cp \
        --python-version "$PYVER" --platform manylinux2014_x86_64 -d "$1" "${@:2}"
}

# The sources the wheel is built from, written as a tar to stdout: the commit IMAGE_SOURCE
# (default HEAD, so edits in progress in a shared working tree never leak into an image),
# or with IMAGE_SOURCE=worktree the working tree's files (tracked and new, not ignored).
readonly SOURCE_PATHS=(konnectivity_fast csrc setup.py pyproject.toml README.md)
project_tar() {
    local source=${IMAGE_SOURCE:-HEAD}
    if [[ $source == worktree ]]; then
        (cd "$ROOT" && git ls-files -co --exclude-standard -- "${SOURCE_PATHS[@]}" \
            | grep -v -E '(\.so|_wire\.c)$' | tar -cf - -T -)
    else
        git -C "$ROOT" archive --format=tar "$source" -- "${SOURCE_PATHS[@]}"
    fi
}

build_wheel() {
    local br=$WORK/buildroot
    debian_root "$OUT/buildroot.tar" "$BUILD_PACKAGES"
    unpack "$OUT/buildroot.tar" "$br"
    PYVER=$(in_root "$br" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    say "build root: Python $PYVER, $(basename "$(readlink -f "$br"/usr/lib/x86_64-linux-gnu/libnghttp2.so)")"
    # The build requirements of pyproject.toml, as wheels for the build root's Python.
    local reqs
    reqs=$("$PYTHON" -c 'import tomllib; print("\n".join(tomllib.load(open("'"$ROOT"'/pyproject.toml","rb"))["build-system"]["requires"]))')
    mapfile -t reqs <<<"$reqs"
    pip_download "$WORK/build-wheels" "${reqs[@]}"
    nice "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --find-links "$WORK/build-wheels" \
        --only-binary=:all: --implementation cp --python-version "$PYVER" \
        --platform manylinux2014_x86_64 --target "$br/opt/pydeps" "$WORK"/build-wheels/*.whl
    mkdir -p "$br/src" "$br/out"
    project_tar | tar -xf - -C "$br/src"
    say "building the wheel in the build root"
    in_root "$br" PYTHONPATH=/opt/pydeps python3 -c '
import os
os.chdir("/src")
from setuptools import build_meta
build_meta.build_wheel("/out")' >/dev/null
    rm -rf "$WORK/wheels"
    mkdir -p "$WORK/wheels"
    cp "$br"/out/*.whl "$WORK/wheels/"
    # The extension must name the shared libnghttp2 (not carry a copy of it).
    rm -rf "$WORK/wheel-check"
    "$PYTHON" -m zipfile -e "$WORK"/wheels/*.whl "$WORK/wheel-check"
    readelf -d "$WORK"/wheel-check/konnectivity_fast/_wire*.so | grep -q 'NEEDED.*libnghttp2\.so\.14' \
        || die "the extension does not link the shared libnghttp2"
    rm -rf "$WORK/wheel-check"
    NGHTTP2_BUILT=$(basename "$(readlink -f "$br"/usr/lib/x86_64-linux-gnu/libnghttp2.so)")
    rm -rf "$br"
}

build_runtime_root() {
    local rr=$WORK/rootfs
    debian_root "$OUT/runtime-root.tar" "$RUNTIME_PACKAGES"
    unpack "$OUT/runtime-root.tar" "$rr"
    local have
    have=$(basename "$(readlink -f "$rr"/usr/lib/x86_64-linux-gnu/libnghttp2.so.14)")
    [[ $have == "$NGHTTP2_BUILT" ]] \
        || die "runtime root has $have, the wheel was built against $NGHTTP2_BUILT"
    pip_download "$WORK/run-wheels" "uvloop>=0.19"
    say "finishing the runtime root (wheels, trims, entrypoints, byte code)"
    # In private mount and PID namespaces: the root's /proc is its own.
    mkdir -p "$rr/proc"
    PIP_PYTHON=$PYTHON nice unshare --mount --pid --fork --mount-proc="$rr/proc" \
        "$ROOT/deploy/images/finish-root.sh" "$rr" "$WORK"/wheels/*.whl "$WORK"/run-wheels/uvloop-*.whl
    tar --numeric-owner -C "$rr" -cf "$WORK/layer.tar" .
    rm -rf "$rr"
}

buildah_env() {
    mkdir -p "$OUT/store"
    cat >"$OUT/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$OUT/store/root"
runroot = "$OUT/store/run"
EOF
    export CONTAINERS_STORAGE_CONF=$OUT/storage.conf BUILDAH_ISOLATION=chroot
}

commit_image() {  # commit_image NAME ENTRYPOINT PORTS...
    local name=$1 entry=$2 ctr
    shift 2
    ctr=$(buildah from scratch)
    buildah add -q "$ctr" "$WORK/layer.tar" / >/dev/null
    local ports=() p
    for p in "$@"; do ports+=(--port "$p/tcp"); done
    buildah config \
        --entrypoint "[\"$entry\"]" --cmd '' --user "$RUN_UID:$RUN_UID" --workingdir / \
        --env KONNECTIVITY_FAST_REQUIRE_COMPILED=1 --env LANG=C.UTF-8 \
        --env PYTHONDONTWRITEBYTECODE=1 "${ports[@]}" \
        --label org.opencontainers.image.title="konnectivity-fast $name" \
        --label org.opencontainers.image.source=konnectivity-fast \
        --label org.opencontainers.image.version="$TAG" \
        --os linux --arch amd64 "$ctr"
    buildah commit -q --rm "$ctr" "$REPO/$name:$TAG" >/dev/null
    rm -f "$OUT/$name.oci.tar"
    buildah push -q "$REPO/$name:$TAG" "oci-archive:$OUT/$name.oci.tar:$REPO/$name:$TAG"
    say "$name: $(du -h "$OUT/$name.oci.tar" | cut -f1) archive, $(du -sh --apparent-size "$WORK/layer.tar" | cut -f1) layer"
    echo "$OUT/$name.oci.tar"
}

main() {
    local started=$SECONDS
    mkdir -p "$OUT" "$WORK"
    exec 9>"$OUT/build.lock"
    flock 9
    ensure_tools
    SUITE=$(suite)
    build_wheel
    build_runtime_root
    buildah_env
    # Ports: upstream's defaults (server: frontend, agent, health, admin; agent: health, admin).
    commit_image proxy-server /proxy-server 8090 8091 8092 8095
    commit_image proxy-agent /proxy-agent 8093 8094
    rm -f "$WORK/layer.tar"
    # Earlier builds' images, untagged by this one, would pile up in the private store.
    buildah rmi --prune >/dev/null 2>&1 || true
    say "done in $((SECONDS - started)) s"
}

main "$@"
