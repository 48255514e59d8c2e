#!/usr/bin/env bash
# Build both Dockerfiles without a Docker engine (buildah, chroot isolation) and run the
# images with podman (runc, read-only root): the check that the Dockerfiles users build
# with Docker work. Needs root and the tools deploy/images/build.sh installs.
#
# No registry is reachable from our build machines, so the Dockerfiles' base image
# (debian:<release>) is made here with mmdebstrap (minbase variant, the host's apt sources)
# and given as DEBIAN_IMAGE. When the host trusts extra CAs (a proxy in front of PyPI), they
# are added to that base, as the host has them; the Dockerfiles themselves are unchanged.
# About 3 minutes with nothing cached. Storage: .cache/images/ (as build.sh).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
readonly ROOT
readonly OUT=$ROOT/.cache/images
readonly BASE=localhost/konnectivity-fast/debian-base:check

say() { printf '[check-dockerfiles] %s\n' "$*" >&2; }

mkdir -p "$OUT/store"
cat >"$OUT/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$OUT/store/root"
runroot = "$OUT/store/run"
EOF
# runc, cgroupfs and ulimits at or below this machine's hard limits (podman's defaults
# ask for more than a VM without CAP_SYS_RESOURCE may grant).
cat >"$OUT/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
netns = "host"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_STORAGE_CONF=$OUT/storage.conf CONTAINERS_CONF=$OUT/containers.conf
export BUILDAH_ISOLATION=chroot

# shellcheck disable=SC1091
suite=$(. /etc/os-release && echo "$VERSION_CODENAME")
if [[ ! -f $OUT/debian-minbase.tar ]]; then
    say "mmdebstrap $suite (minbase) for the base image"
    nice mmdebstrap -q --variant=minbase "$suite" "$OUT/debian-minbase.tar.part.tar"
    mv "$OUT/debian-minbase.tar.part.tar" "$OUT/debian-minbase.tar"
fi
podman import -q "$OUT/debian-minbase.tar" "$BASE" >/dev/null
ctr=$(buildah from "$BASE")
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    buildah copy -q "$ctr" /usr/local/share/ca-certificates/ /usr/local/share/ca-certificates/
fi
if [[ -f /etc/pip.conf ]]; then
    buildah copy -q "$ctr" /etc/pip.conf /etc/pip.conf
fi
buildah commit -q --rm "$ctr" "$BASE" >/dev/null

for image in proxy-server proxy-agent; do
    say "buildah build $image.Dockerfile"
    started=$SECONDS
    (cd "$ROOT" && nice buildah build -q --layers --pull=never --network host \
        --build-arg DEBIAN_IMAGE="$BASE" -f "deploy/images/$image.Dockerfile" \
        --ignorefile "deploy/images/$image.Dockerfile.dockerignore" \
        -t "localhost/konnectivity-fast/$image:dockerfile" .) >/dev/null
    say "$image: built in $((SECONDS - started)) s"
    podman run --rm --read-only "localhost/konnectivity-fast/$image:dockerfile" --help \
        | grep -q "^Usage:" || { say "$image --help fails"; exit 1; }
done
podman run --rm --read-only --entrypoint /usr/bin/python3 \
    localhost/konnectivity-fast/proxy-server:dockerfile -I -c \
    'import konnectivity_fast._compiled as c; assert c.IMPLEMENTATION == "compiled"'
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep ':dockerfile' >&2
buildah rmi --prune >/dev/null 2>&1 || true  # untagged build stages and earlier builds
say "ok"
