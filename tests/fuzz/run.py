"""Run the codec fuzz harness for a while and print a one-line summary.

    .venv/bin/python tests/fuzz/run.py --seconds 30 [--against auto|compiled|official]

The harness (``fuzz_codec.py``) runs in a subprocess under atheris/libFuzzer, seeded from
``tests/fuzz/corpus/`` and ``tests/data/wire/*.bin``; the corpus it grows lives in a
temporary directory, so the checked-in seeds stay as they are. ``--against auto`` compares
the pure twin with the compiled one when that is built and complete, else with the official
protobuf runtime; ``--against mutant`` is the self-test (a planted bug must be found).
Exit status 0 when nothing was found, 1 on a finding (its input and traceback are printed,
and the input is kept under the temporary directory), 2 when it could not run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent


@dataclass(frozen=True)
class Harness:
    script: Path
    seed_dirs: tuple[tuple[Path, str], ...]
    max_len: int  # bytes per input
    label: str  # what is compared with what, for the summary line


HARNESSES = {
    # The codec's paths are all reachable well below 4 KiB.
    "codec": Harness(
        HERE / "fuzz_codec.py",
        ((HERE / "corpus", "*"), (TESTS / "data" / "wire", "*.bin")),
        4096,
        "pure vs {against}",
    ),
    # HTTP/2 inputs are frame sequences: a preface, SETTINGS and a few frames.
    "h2": Harness(HERE / "fuzz_h2.py", ((HERE / "corpus_h2", "*"),), 8192, "engine"),
}


def compiled_status() -> str | None:
    """None when the compiled twin can be fuzzed, else why not (checked in a subprocess,
    so this process never imports the package)."""
    probe = (
        "import os, sys; sys.path.insert(0, sys.argv[1]);"
        "os.environ.setdefault('KONNECTIVITY_FAST_PURE', '1');"
        "from tests.support import oracle; oracle.load_twin('compiled')"
    )
    env = dict(os.environ)
    if env.get("KONNECTIVITY_FAST_REQUIRE_COMPILED") == "1":
        env.pop("KONNECTIVITY_FAST_PURE", None)
    proc = subprocess.run(
        [sys.executable, "-c", probe, str(TESTS.parent)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode == 0:
        return None
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {proc.returncode}"


def seed(corpus: Path, harness: Harness) -> int:
    corpus.mkdir(parents=True)
    count = 0
    for directory, pattern in harness.seed_dirs:
        for path in sorted(directory.glob(pattern)):
            if path.is_file():
                shutil.copyfile(path, corpus / f"{directory.name}-{path.name}")
                count += 1
    return count


def run(harness: str, seconds: int, against: str) -> int:
    spec = HARNESSES[harness]
    note = ""
    if against == "auto" and harness == "codec":
        why_not = compiled_status()
        against = "compiled" if why_not is None else "official"
        note = "" if why_not is None else f" (compiled twin unavailable: {why_not})"
    work = Path(tempfile.mkdtemp(prefix=f"kf-fuzz-{harness}-"))
    seeds = seed(work / "corpus", spec)
    cmd = [
        sys.executable,
        str(spec.script),
        str(work / "corpus"),
        f"-max_total_time={seconds}",
        f"-max_len={spec.max_len}",
        f"-artifact_prefix={work}/",
        "-timeout=30",
        "-rss_limit_mb=4096",
        "-print_final_stats=1",
    ]
    env = dict(os.environ, KF_FUZZ_AGAINST=against)
    try:
        proc = subprocess.run(
            cmd,
            check=False,
            capture_output=True,
            text=True,
            env=env,
            timeout=seconds + 300,
            cwd=work,
        )
        output, status = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        parts = [
            p.decode(errors="replace") if isinstance(p, bytes) else p or ""
            for p in (exc.stdout, exc.stderr)
        ]
        output, status = "".join(parts) + "\nrun.py: timed out", -1
    runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", output)
    crashes = sorted(work.glob("crash-*")) + sorted(work.glob("timeout-*"))
    corpus_size = len(list((work / "corpus").iterdir()))
    head = (
        f"fuzz {harness}: {spec.label.format(against=against)}{note}, {seconds} s, "
        f"{runs[-1] if runs else '?'} runs, {seeds} seeds, corpus {corpus_size}"
    )
    if status == 0 and not crashes:
        print(f"{head}: OK")
        shutil.rmtree(work, ignore_errors=True)
        return 0
    # atheris prints the exception (our Discrepancy and its input) before libFuzzer's report.
    start = output.find("=== Uncaught Python exception")
    print(output[start : start + 6000] if start >= 0 else output[-6000:], file=sys.stderr)
    if crashes:
        finding = crashes[0].read_bytes()
        if against == "mutant":  # the expected finding of the self-test: nothing to keep
            shutil.rmtree(work, ignore_errors=True)
            print(f"{head}: FINDING, input {finding[:256].hex()}")
        else:
            print(f"{head}: FINDING, input {finding[:256].hex()} (kept in {crashes[0]})")
        return 1
    print(f"{head}: FAILED to run (exit status {status}; see {work})")
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--harness", choices=[*sorted(HARNESSES), "all"], default="all")
    parser.add_argument(
        "--against", choices=["auto", "compiled", "official", "mutant"], default="auto"
    )
    args = parser.parse_args(argv)
    names = sorted(HARNESSES) if args.harness == "all" else [args.harness]
    return max(run(name, args.seconds, args.against) for name in names)


if __name__ == "__main__":
    sys.exit(main())
