"""Running the built container images without a container engine: each OCI archive made by
deploy/images/build.sh is unpacked with umoci into a bundle (the image's root filesystem and
the runtime configuration its config produced: entrypoint, environment, user), and a command
runs from that root the way a container runtime would run it:

* private mount and PID namespaces (``unshare``), so nothing is mounted on the host and the
  program is PID 1 of its own tree (killing ``unshare`` kills it: ``--kill-child``);
* the root bind-mounted read-only (``readOnlyRootFilesystem: true``), with chosen host
  folders bound inside it (like volumes) and a fresh /proc;
* ``chroot --userspec`` to the image's user, with exactly the image's environment.

The host's network namespace is shared (a pod's ``hostNetwork``): programs listen on
127.0.0.1 only.

The archives are built by the test session in CI (``CI=true``) or with
``KF_BUILD_IMAGES=1``; elsewhere the tests skip when they are missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "deploy" / "images" / "build.sh"
ARCHIVES = ROOT / ".cache" / "images"
IMAGES = ("proxy-server", "proxy-agent")
# A cold build makes two Debian roots with mmdebstrap and compiles the wheel: about two
# minutes on two shared cores; bounded so that a wedged download fails the session.
BUILD_TIMEOUT_SECONDS = 1200
UNPACK_TIMEOUT_SECONDS = 120
# The tools the bundles need on the host.
HOST_TOOLS = ("umoci", "unshare", "chroot", "mount")
# The runner script (host side, before chroot): $1 the root, then pairs of host folder and
# path in the root, "--", then the command. Mounts stay in the private mount namespace.
_RUNNER = r"""
set -eu
root=$1; shift
mount --bind "$root" "$root"
while [ "$1" != "--" ]; do
    mount --bind "$1" "$root$2"
    shift 2
done
shift
mount -o remount,bind,ro "$root"
mount -t proc proc "$root/proc"
exec chroot --userspec="$KF_USERSPEC" "$root" "$@"
"""


def ci() -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("KF_BUILD_IMAGES") == "1"


def archive(name: str) -> Path:
    return ARCHIVES / f"{name}.oci.tar"


def ensure_built() -> None:
    """Build the images in CI; elsewhere skip when they are missing."""
    if os.geteuid() != 0:
        if ci():
            pytest.fail("the image tests need root (mount namespaces, chroot)")
        pytest.skip("the image tests need root")
    if ci():
        proc = subprocess.run(
            [str(BUILD_SCRIPT)],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_SECONDS,
            check=False,
        )
        if proc.returncode != 0:
            pytest.fail(f"deploy/images/build.sh failed:\n{proc.stderr[-4000:]}")
    missing = [name for name in IMAGES if not archive(name).is_file()]
    if missing:
        pytest.skip(f"images not built ({', '.join(missing)}): run `make images`")
    absent = [tool for tool in HOST_TOOLS if shutil.which(tool) is None]
    if absent:
        pytest.fail(f"missing host tools {absent} (deploy/images/build.sh installs umoci)")


@dataclass(frozen=True)
class Bundle:
    """An unpacked image: its root filesystem and its runtime configuration."""

    name: str
    rootfs: Path
    args: list[str]
    env: list[str]
    uid: int
    gid: int
    cwd: str

    @property
    def env_map(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.env)

    def command(self, argv: list[str], binds: dict[Path, str] | None = None) -> list[str]:
        """The host command running ``argv`` (absolute path in the image first) in the
        image, with ``binds`` (host folder: absolute path in the image) mounted; the
        folders are created in the root when missing."""
        pairs: list[str] = []
        for host, inside in (binds or {}).items():
            (self.rootfs / inside.lstrip("/")).mkdir(parents=True, exist_ok=True)
            pairs += [str(host), inside]
        env = [*self.env, f"KF_USERSPEC={self.uid}:{self.gid}"]
        return [
            "env",
            "-i",
            *env,
            "unshare",
            "--mount",
            "--pid",
            "--fork",
            "--kill-child",
            "sh",
            "-c",
            _RUNNER,
            "runner",
            str(self.rootfs),
            *pairs,
            "--",
            *argv,
        ]

    def entrypoint(self, args: list[str], binds: dict[Path, str] | None = None) -> list[str]:
        """The image's own entrypoint with ``args``, as ``docker run IMAGE ARGS`` runs it."""
        return self.command([*self.args, *args], binds)


def unpack(name: str, dest: Path) -> Bundle:
    """Unpack the image ``name`` from its OCI archive into ``dest``."""
    layout = dest / "layout"
    with tarfile.open(archive(name)) as tar:
        tar.extractall(layout, filter="tar")
    index = json.loads((layout / "index.json").read_text())
    (manifest,) = index["manifests"]
    ref = manifest["annotations"]["org.opencontainers.image.ref.name"]
    bundle = dest / "bundle"
    subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:{ref}", str(bundle)],
        check=True,
        capture_output=True,
        timeout=UNPACK_TIMEOUT_SECONDS,
    )
    config = json.loads((bundle / "config.json").read_text())
    process = config["process"]
    return Bundle(
        name=name,
        rootfs=bundle / "rootfs",
        args=list(process["args"]),
        env=list(process["env"]),
        uid=int(process["user"]["uid"]),
        gid=int(process["user"]["gid"]),
        cwd=process["cwd"],
    )


@contextlib.contextmanager
def running(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A background process writing to ``log``; killed (with its PID namespace) on exit."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        # The program is the init of unshare's PID namespace: killing it ends the whole
        # namespace. Killing unshare alone is not enough: --kill-child's parent-death
        # signal is cleared when chroot --userspec changes the user.
        children = _children(proc.pid)
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(_alive(child) for child in children):
            assert time.monotonic() < deadline, f"image processes {children} outlived the test"
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for a reaper."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
