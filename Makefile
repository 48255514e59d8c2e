# konnectivity-fast. `make run` and `make test` are the two commands of the README; each
# sets up what it needs (scripts/bootstrap.sh) on a fresh Debian machine.
PY := .venv/bin/python
BUILD_LOCK := /tmp/konnectivity-fast-build.lock

# Every target is a command, none is a file (tests/test_makefile.py checks the list).
.PHONY: bootstrap bootstrap-runtime bootstrap-bench build debug asan vendored wheel run test \
	test-quick lint fuzz fuzz-long bench bench-tunnel bench-echo bench-micro bench-agent-rss \
	clean images interop chaos ha bench-abuse bench-n2cp bench-scale bench-workers

bootstrap:
	scripts/bootstrap.sh test

bootstrap-runtime:
	scripts/bootstrap.sh runtime

# The benchmarks' dependencies (the bench extra: charts).
bootstrap-bench:
	scripts/bootstrap.sh bench

# In-place build of the compiled core. flock: parallel builds share ./build.
build:
	flock $(BUILD_LOCK) $(PY) setup.py -q build_ext --inplace

# The other tiers of the compiled core (setup.py), built into build/<tier>/ beside the
# release build, never over it. debug: line tracing, bounds checks and C asserts; run a
# command with it through scripts/core-tier.sh, e.g.
#   scripts/core-tier.sh debug .venv/bin/python -m pytest tests/h2
# asan: AddressSanitizer + UBSan, running the engine, codec and fuzz smoke tests
# (scripts/asan.sh; `make test` runs its short form).
debug: bootstrap-runtime
	scripts/core-tier.sh debug

asan: bootstrap
	scripts/asan.sh

# The engine and codec tests against the pinned libnghttp2 that the wheel compiles in
# (scripts/fetch-nghttp2.sh), in build/vendored/ beside the release build; `make test`
# runs them too. KF_NGHTTP2_SRC=DIR tries another nghttp2 source tree the same way.
vendored: bootstrap
	scripts/core-tier.sh vendored $(PY) -m pytest -q -p no:cacheprovider tests/h2 tests/wire

# The installable wheel, with the pinned libnghttp2 compiled in and repaired to a
# manylinux tag, in dist/ (scripts/wheel.sh; README "Installing the wheel").
wheel:
	scripts/wheel.sh

# The real proxy-server and proxy-agent at work (konnectivity-fast demo --help); e.g.
# make run ARGS=--keep, or ARGS=--topology=remote (as root, with ip and haproxy).
run:
	scripts/bootstrap.sh runtime
	$(PY) -m konnectivity_fast.cli.main demo $(ARGS)

test:
	scripts/test.sh

test-quick: build
	$(PY) -m pytest -q -x

lint:
	$(PY) -m ruff check konnectivity_fast tests bench
	$(PY) -m ruff format --check konnectivity_fast tests bench
	$(PY) -m mypy

fuzz: build
	$(PY) tests/fuzz/run.py --seconds 30

fuzz-long: build
	$(PY) tests/fuzz/run.py --seconds 3600

bench-echo: bootstrap-bench
	$(PY) -m bench.echo

bench-micro: bootstrap-bench
	$(PY) -m pytest bench/micro --benchmark-only -q

# Idle RSS of our proxy-agent and upstream's holding three proxy-servers, same run
# (bench/agent_rss.py): with default flags, then counting Leases as the DaemonSet does.
bench-agent-rss: bootstrap-bench
	$(PY) -m bench.agent_rss --json bench/results/agent-rss.json
	$(PY) -m bench.agent_rss --leases --json bench/results/agent-rss-leases.json

clean:
	rm -rf build dist konnectivity_fast/_wire.c konnectivity_fast/_wire*.so

# Container images (OCI archives in .cache/images/) without a Docker engine; needs root.
images:
	deploy/images/build.sh

# The benchmark: our proxy-server + proxy-agent against upstream v0.36.0 and direct TCP
# (bench/README.md): JSON and PNG in bench/results/ (the slow readers' chart: tunnel-slow.png).
# QUICK=1 for the under-3-minutes mode (its own files: tunnel-quick.*). bench-tunnel is the
# older name.
TUNNEL_OUT := bench/results/tunnel$(if $(QUICK),-quick)
bench bench-tunnel: bootstrap-bench
	$(PY) -m bench.tunnel $(if $(QUICK),--quick) --json $(TUNNEL_OUT).json --chart $(TUNNEL_OUT).png

# The head-of-line family alone (stalled and slow readers), every pairing (our server with
# upstream's agent, and ours with flow.v1, too): bench/results/tunnel-hol.{json,png}.
# QUICK=1: 1 run, the 4 MB/s reader only (tunnel-hol-quick.*).
HOL_OUT := bench/results/tunnel-hol$(if $(QUICK),-quick)
.PHONY: bench-hol
bench-hol: build
	$(PY) -m bench.tunnel --family hol $(if $(QUICK),--quick) --json $(HOL_OUT).json --chart $(HOL_OUT).png

# Interop with upstream's Go programs: builds the Go tools (tests/interop/build.sh: goclient
# on konnectivity-client v0.36.0 and v0.37.0, h2spec, wiregen, upstream's suite), then runs
# the matrix (summary table at the end), h2spec, upstream's suite against our agent and the
# golden wire fixtures.
interop: build
	bash tests/interop/build.sh >/dev/null
	$(PY) -m pytest -p no:cacheprovider -rs tests/interop tests/wire/test_golden_fixtures.py

# The chaos family's long form (tests/chaos/, KF_CHAOS=long): kill -9 mid-transfer, broken
# backends, slow readers, floods on every listener, descriptor exhaustion, hostile agents,
# with bigger transfers and longer floods than `make test`'s short form, every mode, TCP
# frontends, memory given back after a minute of idleness, and upstream v0.36.0's server
# attacked the same way where it can be (its figures printed beside ours; built first if
# needed). About 15 minutes.
chaos: build
	KF_CHAOS=long KONNECTIVITY_FAST_REQUIRE_COMPILED=1 $(PY) -m pytest -p no:cacheprovider -q -s tests/chaos

# The highly-available control plane's long form (tests/apiserver_egress/test_ha.py,
# KF_HA=long): three real kube-apiservers, each with a proxy-server, behind a sticky
# HAProxy; a minute-long guard window and every server implementation. Needs root and
# haproxy; builds upstream v0.36.0 and kube-apiserver first if needed. A few minutes.
ha: build
	scripts/build-upstream.sh >/dev/null
	scripts/build-kube.sh >/dev/null
	KF_HA=long KONNECTIVITY_FAST_REQUIRE_COMPILED=1 $(PY) -m pytest -p no:cacheprovider -q -s tests/apiserver_egress/test_ha.py

# What hostile agents cost the server, ours against upstream v0.36.0 (bench/abuse.py):
# CPU per bogus packet and per agent connect.
bench-abuse: build
	$(PY) -m bench.abuse

# Node-to-control-plane tunnels against the forward direction, ours only, same run
# (bench/node_to_cp.py): throughput, 1 KiB round trip, forward beside a stalled reverse client.
bench-n2cp: build
	$(PY) -m bench.node_to_cp --json bench/results/node-to-cp.json

# The proxy-server at cluster scale, ours against upstream v0.36.0 (bench/server_scale.py):
# a swarm of fake agents (bench/loadgen swarm.go) for N = 1,000 and 3,000 (memory per
# agent, connect CPU, connect storm, tunnel set-ups over all agents), then 20 rounds of
# 2,000 agents joining and leaving (RSS per round). About 15 minutes.
bench-scale: build
	$(PY) -m bench.server_scale --agents 1000 3000 --churn 20 --churn-agents 2000 --json bench/results/server-scale.json

# proxy-server --workers on this machine: our server with 1 and 2 worker processes, upstream
# v0.36.0 for reference, same run, 2,000 fake agents each holding one connection per worker
# (bench/server_scale.py --workers-compare): connect storm, connect CPU, memory per agent,
# tunnel set-ups; medians of 5 interleaved runs, each 2-worker / 1-worker ratio. ~3 minutes.
bench-workers: build
	$(PY) -m bench.server_scale --workers-compare 1 2 --agents 2000 --repeats 5 --json bench/results/server-workers.json
