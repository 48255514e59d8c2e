"""Summary of the py-spy recordings ``bench.tunnel --profile DIR`` leaves: per file, the
functions with the most samples on top of the stack (self) and anywhere on it (total).

    .venv/bin/python -m bench._tunnel_profile DIR [--top N]

Input: py-spy's raw format, one collapsed stack per line, ``frame;frame;... count``, the
leaf last. Invariant: it reads the files only; a frame's file path is shortened to its
part below site-packages or the repository.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

# "function (path/to/file.py:123)" -> "function (file.py:123)" below a known root.
# A native frame py-spy could not name (stripped libraries): "0x7f... (libfoo.so)".
_ADDRESS = re.compile(r"^0x[0-9a-f]+\b")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<path>[^:]*):?(?P<line>\d*)\)$")


def _short(frame: str) -> str:
    frame = frame.strip()
    if _ADDRESS.match(frame):
        lib = frame[frame.find("(") + 1 : frame.rfind(")")] if "(" in frame else "?"
        return f"(unnamed code in {lib})"
    m = _FRAME.match(frame)
    if m is None:
        return frame
    path = m["path"]
    for root in ("site-packages/", "konnectivity_fast/", "lib/python3"):
        if root in path:
            path = path[path.index(root) :]
            break
    return f"{m['func']} ({path})"


def summarize(path: Path, top: int) -> str:
    self_c: Counter[str] = Counter()
    total_c: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        samples += n
        self_c[frames[-1]] += n
        for f in set(frames):
            total_c[f] += n
    out = [f"== {path.name}: {samples} samples"]
    out.append("  self %  function")
    out += [f"  {100 * c / samples:5.1f}  {f}" for f, c in self_c.most_common(top)]
    out.append("  total %  function")
    out += [f"  {100 * c / samples:5.1f}  {f}" for f, c in total_c.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench._tunnel_profile")
    p.add_argument("folder", type=Path)
    p.add_argument("--top", type=int, default=15)
    a = p.parse_args(argv)
    for f in sorted(a.folder.glob("*.txt")):
        print(summarize(f, a.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
