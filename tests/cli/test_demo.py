"""``konnectivity-fast demo`` (``make run``) end to end: the command ``make run`` runs,
its output, and, read from outside the demo, the programs it started.

- the plain run: exit 0, both modes carried their requests, the final counters (scraped
  by the demo from each program) show DATA and dials through both proxy-servers and the
  agents, and no process is left;
- ``--keep``: the processes are ours (their command lines), the test scrapes their
  metrics itself, runs the commands the demo prints (a request through the HTTP-CONNECT
  frontend, the doctor) and stops them with the printed ``--stop``;
- ``--topology=remote``: the same in network namespaces behind HAProxy (needs root, ``ip``
  and ``haproxy``: skipped without them, except in CI where that fails), and without
  them a clear refusal.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.upstream import http_get, parse_exposition

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
DEMO_SECONDS = 180
PID = re.compile(r"pid (\d+)")
# A final-counters line: "    metric{labels} value".
SAMPLE = re.compile(r"^    (konnectivity_network_proxy_\w+)(\{[^}]*\})? (\S+)$", re.M)
SERVER = "konnectivity_network_proxy_server_"
AGENT = "konnectivity_network_proxy_agent_"
# 64 MiB per mode: more DATA packets than any small exchange makes.
MIN_DATA_PACKETS = 100


def make_run_command() -> list[str]:
    """The demo command of ``make run`` (after its bootstrap line), as the Makefile says."""
    text = (ROOT / "Makefile").read_text()
    recipe = text.split("\nrun:\n", 1)[1].split("\n\n", 1)[0]
    lines = [line.strip() for line in recipe.splitlines() if line.startswith("\t")]
    assert lines[0] == "scripts/bootstrap.sh runtime", lines
    words = shlex.split(lines[1].replace("$(PY)", sys.executable).replace("$(ARGS)", ""))
    assert words[1:] == ["-m", "konnectivity_fast.cli.main", "demo"], words
    return words


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*make_run_command(), *args],
        capture_output=True,
        text=True,
        timeout=DEMO_SECONDS,
        cwd=ROOT,
        check=False,
    )


def sections(output: str) -> dict[str, str]:
    """The output's sections by their title's first word(s)."""
    parts = re.split(r"\n(?=\S)", output)
    return {part.split("\n", 1)[0]: part for part in parts}


def final_counters(output: str) -> dict[str, dict[str, float]]:
    """program name -> sample -> value, from the "Final counters" section."""
    block = output.split("Final counters", 1)[1].split("\n\n", 1)[0]
    counters: dict[str, dict[str, float]] = {}
    program = ""
    for line in block.splitlines()[1:]:
        if line.startswith("  proxy-"):
            program = line.split()[1]
            counters[program] = {}
        elif m := SAMPLE.match(line):
            counters[program][m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return counters


def data(samples: dict[str, float], prefix: str, segment: str) -> float:
    return samples.get(f'{prefix}stream_packets_total{{packet_type="DATA",segment="{segment}"}}', 0)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def check_carried_both_modes(output: str, agents: list[str]) -> None:
    """The demo's own words, then the programs' counters as it scraped them."""
    for title in ("gRPC frontend", "HTTP-CONNECT frontend"):
        part = next(v for k, v in sections(output).items() if k.startswith(title))
        assert "200 ok" in part, part
        assert "every byte checked" in part, part
        assert "carried by" in part, part
    counters = final_counters(output)
    for server in ("server-grpc", "server-http-connect"):
        samples = counters[server]
        assert data(samples, SERVER, "from_agent") >= MIN_DATA_PACKETS, samples
        assert data(samples, SERVER, "to_agent") >= 1, samples
        assert samples[f"{SERVER}dial_duration_seconds_count"] >= 21, samples
    total_agent_dials = sum(counters[a][f"{AGENT}dial_duration_seconds_count"] for a in agents)
    assert total_agent_dials >= 42
    assert sum(data(counters[a], AGENT, "from_agent") for a in agents) >= 2 * MIN_DATA_PACKETS
    for agent in agents:
        assert counters[agent][f"{AGENT}open_server_connections"] == 2


def test_make_run(tmp_path: Path) -> None:
    done = run_demo()
    output = done.stdout
    assert done.returncode == 0, output + done.stderr
    assert "demo: OK" in output
    check_carried_both_modes(output, ["agent-1", "agent-2"])
    pids = [int(p) for p in PID.findall(sections(output)["Setting up"])]
    assert len(pids) == 6  # backend, 2 servers, balancer, 2 agents
    assert not [pid for pid in pids if alive(pid)], "processes left behind"
    folder = re.search(r"(/tmp/kf-demo-\w+)/pki", output)
    assert folder is not None and not Path(folder.group(1)).exists()


def test_keep_then_stop() -> None:
    done = run_demo("--keep")
    output = done.stdout
    stop = re.search(r"demo --stop=(\S+)", output)
    pids: list[int] = []
    try:
        assert done.returncode == 0, output + done.stderr
        kept = sections(output)["Left running (--keep). Try by hand:"]
        assert stop is not None
        pids = [int(p) for p in PID.findall(sections(output)["Setting up"])]
        commands = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in pids}
        programs = [b" ".join(argv) for argv in commands.values()]
        assert sum(b"konnectivity_fast.server" in p for p in programs) == 2
        assert sum(b"konnectivity_fast.agent" in p for p in programs) == 2
        # The metrics, read by this test: both servers carried DATA from an agent.
        ports = [int(p) for p in re.findall(r"curl -s http://127.0.0.1:(\d+)/metrics", kept)]
        assert len(ports) == 4
        for port in ports[:2]:
            status, body = http_get(port, "/metrics")
            assert status == 200
            family = parse_exposition(body.decode())[f"{SERVER}stream_packets_total"]
            sample = f'{SERVER}stream_packets_total{{packet_type="DATA",segment="from_agent"}}'
            assert family.samples[sample] >= MIN_DATA_PACKETS
        # The printed commands work: a GET through the HTTP-CONNECT frontend, the doctor.
        ran_through = ran_doctor = 0
        for line in kept.splitlines()[1:]:
            command = line.strip()
            if not line.startswith("  ") or command.startswith("#") or "curl" in command:
                continue  # the title, comments, the stop line (below); curl: scraped above
            argv = shlex.split(command)
            if "konnectivity-fast" in argv[0]:
                # The console script of the shared test virtualenv may belong to another
                # checkout: run this checkout's, the same command otherwise.
                argv = [sys.executable, "-m", "konnectivity_fast.cli.main", *argv[1:]]
            ran = subprocess.run(
                argv, capture_output=True, text=True, timeout=60, cwd=ROOT, check=False
            )
            assert ran.returncode == 0, (command, ran.stdout, ran.stderr)
            if "through" in command:
                assert "200 OK" in ran.stdout and ran.stdout.rstrip().endswith("ok"), ran.stdout
                ran_through += 1
            if "doctor" in command:
                ran_doctor += 1
            if "doctor lb" in command:
                assert "Verdict: OK" in ran.stdout, ran.stdout
        assert (ran_through, ran_doctor) == (1, 3)
    finally:
        if stop is not None:
            stopped = subprocess.run(
                [*make_run_command(), f"--stop={stop.group(1)}"],
                capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
            )  # fmt: skip
            assert stopped.returncode == 0, stopped.stdout
            assert "stopped" in stopped.stdout
    assert not [pid for pid in pids if alive(pid)], "processes left behind by --stop"


def remote_missing() -> list[str]:
    missing = [tool for tool in ("ip", "haproxy") if shutil.which(tool) is None]
    return missing + ([] if os.geteuid() == 0 else ["root"])


def test_remote_topology() -> None:
    missing = remote_missing()
    if missing:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the remote demo needs {missing}")
        pytest.skip(f"the remote demo needs {missing}")
    done = run_demo("--topology=remote")
    output = done.stdout
    assert done.returncode == 0, output + done.stderr
    assert "kfdemo-cp" in output and "HAProxy" in output
    check_carried_both_modes(output, ["agent-w1", "agent-w2"])
    counters = final_counters(output)
    # destHost: the tunnels to each worker's address were dialled by that worker's agent,
    # so both agents dialled.
    for agent in ("agent-w1", "agent-w2"):
        assert counters[agent][f"{AGENT}dial_duration_seconds_count"] >= 1
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert "kfdemo-" not in listed.stdout, "namespaces left behind"
    routes = subprocess.run(["ip", "route"], capture_output=True, text=True, check=True)
    assert "10.232.0.0/16" not in routes.stdout, "the guard route was left behind"


def test_remote_topology_says_what_is_missing(tmp_path: Path) -> None:
    """Without `ip` and `haproxy` on PATH (the interpreter found by its full path)."""
    env = {**os.environ, "PATH": str(tmp_path)}
    done = subprocess.run(
        [*make_run_command(), "--topology=remote"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout
    assert "`ip` (Debian package iproute2)" in done.stdout
    assert "`haproxy` (Debian package haproxy)" in done.stdout
