"""The package refuses a missing or stale compiled core, unless the pure codec is asked for.

Each case runs a fresh interpreter, because the choice is made once, at import.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A finder that makes the compiled extension unimportable, as if it were never built.
BLOCK_EXTENSION = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "konnectivity_fast._wire":
            raise ImportError("simulated: not built")
sys.meta_path.insert(0, Block())
"""


def run_python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KONNECTIVITY_FAST_")}
    full_env.update(env)
    full_env["PYTHONPATH"] = str(cwd)
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_missing_extension_fails_loudly() -> None:
    r = run_python(BLOCK_EXTENSION + "import konnectivity_fast", ROOT)
    assert r.returncode != 0
    assert "compiled core konnectivity_fast._wire is missing" in r.stderr
    assert "KONNECTIVITY_FAST_PURE=1" in r.stderr


def test_pure_fallback_when_asked() -> None:
    code = BLOCK_EXTENSION + (
        "import konnectivity_fast\n"
        "from konnectivity_fast.wire import codec, Packet, PacketType, Data\n"
        "p = Packet(PacketType.DATA, Data(3, data=b'x'))\n"
        "assert codec.decode_packet(codec.encode_packet(p)) == p\n"
        "print(konnectivity_fast.IMPLEMENTATION, codec.encode_packet.__module__)\n"
    )
    r = run_python(code, ROOT, KONNECTIVITY_FAST_PURE="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["pure", "konnectivity_fast.wire._codec"]


def test_compiled_is_the_default() -> None:
    r = run_python("import konnectivity_fast; print(konnectivity_fast.IMPLEMENTATION)", ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "compiled"


def test_pure_and_require_compiled_conflict() -> None:
    r = run_python(
        "import konnectivity_fast",
        ROOT,
        KONNECTIVITY_FAST_PURE="1",
        KONNECTIVITY_FAST_REQUIRE_COMPILED="1",
    )
    assert r.returncode != 0
    assert "conflicts with" in r.stderr


def test_stale_build_is_refused(tmp_path: Path) -> None:
    """A checkout whose compiled-core sources changed after the build must not import."""
    shutil.copytree(ROOT / "konnectivity_fast", tmp_path / "konnectivity_fast")
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    assert list((tmp_path / "konnectivity_fast").glob("_wire*.so")), "build first"
    ok = run_python("import konnectivity_fast", tmp_path)
    assert ok.returncode == 0, ok.stderr
    with (tmp_path / "csrc" / "codec.pxi").open("a") as f:
        f.write("\n# an edit made after the build\n")
    r = run_python("import konnectivity_fast", tmp_path)
    assert r.returncode != 0
    assert "compiled core is stale" in r.stderr


def test_engine_missing_with_pure_codec_fails_loudly() -> None:
    """The pure codec has no HTTP/2 engine to fall back on: the transport layer refuses."""
    code = BLOCK_EXTENSION + "import konnectivity_fast.transport.grpc"
    r = run_python(code, ROOT, KONNECTIVITY_FAST_PURE="1")
    assert r.returncode != 0
    assert "compiled core konnectivity_fast._wire is missing" in r.stderr


def test_stale_engine_with_pure_codec_is_refused(tmp_path: Path) -> None:
    """With the pure codec nothing else loads the extension; the transport layer checks it
    before importing the engine's names from it."""
    shutil.copytree(ROOT / "konnectivity_fast", tmp_path / "konnectivity_fast")
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    assert list((tmp_path / "konnectivity_fast").glob("_wire*.so")), "build first"
    with (tmp_path / "csrc" / "h2.pxi").open("a") as f:
        f.write("\n# an edit made after the build\n")
    code = "import konnectivity_fast.transport.grpc"
    r = run_python(code, tmp_path, KONNECTIVITY_FAST_PURE="1")
    assert r.returncode != 0
    assert "compiled core is stale" in r.stderr
