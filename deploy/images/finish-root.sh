#!/bin/sh
# finish-root.sh ROOT WHEEL...: turn a Debian runtime root (python3, libnghttp2-14 and
# netbase, unpacked without maintainer scripts: mmdebstrap's extract variant) into the
# images' root filesystem. Shared by build.sh (daemonless build) and the Dockerfiles.
#
#   - passwd/group with root and nobody (the extract variant writes none);
#   - the wheels (ours and uvloop) installed into /usr/local/lib/python3.X/dist-packages
#     with the pip of $PIP_PYTHON (default python3; it need not be the root's Python),
#     their extensions stripped;
#   - what nothing runs at run time removed: dpkg and tar (pulled in as dependencies),
#     apt's state, documentation, locales, gconv, Python's docs, tests and installers;
#   - deploy/images/rootfs/ copied in (the entrypoints /proxy-server and /proxy-agent, and a
#     Python `sleep` for preStop hooks), the folder given by $ROOTFS_FILES;
#   - byte code compiled by the root's own Python (chroot; needs CAP_SYS_CHROOT) for our
#     packages and every standard module the programs import, so that a read-only root
#     costs nothing at start-up;
#   - a smoke test: both entrypoints' --help as the images' user, compiled core required.
set -eu
root=$1
shift
PIP_PYTHON=${PIP_PYTHON:-python3}
ROOTFS_FILES=${ROOTFS_FILES:-$(dirname "$0")/rootfs}
# The unprivileged user the images run as (Debian's nobody/nogroup).
RUN_UID=65534

pyver=$(chroot "$root" /usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
site=$root/usr/local/lib/python$pyver/dist-packages
lib=$root/usr/lib/python$pyver

printf 'root:x:0:0:root:/root:/usr/sbin/nologin\nnobody:x:%s:%s:nobody:/nonexistent:/usr/sbin/nologin\n' \
    "$RUN_UID" "$RUN_UID" >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:%s:\n' "$RUN_UID" >"$root/etc/group"

"$PIP_PYTHON" -m pip install -q --no-index --no-deps --no-compile \
    --only-binary=:all: --implementation cp --python-version "$pyver" \
    --platform manylinux2014_x86_64 --platform linux_x86_64 --target "$site" "$@"
rm -rf "$site/bin"  # console scripts name the installing interpreter; the entrypoints replace them
# uvloop's wheel ships its extension with symbols (14 MB).
find "$site" -name '*.so' -exec strip --strip-unneeded {} +

rm -rf "$root"/usr/share/doc "$root"/usr/share/man "$root"/usr/share/info \
    "$root"/usr/share/locale "$root"/usr/share/lintian "$root"/usr/lib/x86_64-linux-gnu/gconv \
    "$root"/var/cache/apt "$root"/var/lib/apt "$root"/var/log/* "$root"/usr/bin/dpkg* \
    "$root"/usr/sbin/dpkg* "$root"/bin/tar "$root"/usr/sbin/rmt* "$root"/usr/share/dpkg \
    "$lib"/pydoc_data "$lib"/test "$lib"/ensurepip "$lib"/lib2to3 "$lib"/idlelib

cp -R "$ROOTFS_FILES/." "$root/"
chmod 0755 "$root/proxy-server" "$root/proxy-agent" "$root/usr/bin/sleep"
mkdir -p "$root/tmp"
chmod 1777 "$root/tmp"

chroot "$root" /usr/bin/python3 -I -c '
import compileall, py_compile, sys
import konnectivity_fast.cli.proxy_server, konnectivity_fast.cli.proxy_agent
import konnectivity_fast.server.app, konnectivity_fast.agent.app
import asyncio, ssl, json, email.utils, urllib.parse, uuid, http.client, encodings.idna
for module in list(sys.modules.values()):
    path = getattr(module, "__file__", None)
    if path and path.endswith(".py"):
        py_compile.compile(path, quiet=1)
compileall.compile_dir(sys.argv[1], quiet=1)
' "${site#"$root"}"

for entry in /proxy-server /proxy-agent; do
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin KONNECTIVITY_FAST_REQUIRE_COMPILED=1 \
        chroot --userspec="$RUN_UID:$RUN_UID" "$root" "$entry" --help >/dev/null || {
        echo "finish-root.sh: $entry --help fails in the root" >&2
        exit 1
    }
done
