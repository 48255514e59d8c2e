#!/usr/bin/env bash
# Set up konnectivity-fast on a fresh Debian machine, idempotently:
#   system packages (libnghttp2-dev for the compiled core, a C compiler),
#   a virtualenv in .venv with the Python dependencies,
#   an in-place build of the compiled extension, and an editable install (console scripts).
# Usage: scripts/bootstrap.sh [runtime|test|bench|wheel]   (default: runtime)
#   runtime: the programs; test: `make test` (the test, bench and wheel extras: the suite
#   runs the benchmarks' smoke tests, which draw a chart, and builds the wheel); bench: the
#   benchmarks (test and bench extras); wheel: `make wheel` (the wheel extra: auditwheel).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-runtime}

# gcc also brings AddressSanitizer's and UBSan's runtimes (libasan8, libubsan1, through
# libgcc-12-dev) for `make asan`.
APT_PACKAGES=(libnghttp2-dev pkg-config gcc make python3-venv)
# Tests also need HAProxy (the load balancer in front of several servers), iproute2 and
# nftables (network namespaces, and the load balancer's firewall in
# tests/remote_control_plane). Go (>= 1.21, which fetches newer toolchains from the module
# proxy itself) comes with the machine; scripts/build-*.sh say so clearly when it is missing.
# The pinned libnghttp2 of the wheel and of the vendored test build is downloaded with curl
# (scripts/fetch-nghttp2.sh).
case "$profile" in
  runtime | bench) ;;
  wheel) APT_PACKAGES+=(curl ca-certificates) ;;
  test) APT_PACKAGES+=(haproxy iproute2 nftables curl ca-certificates) ;;
  *) echo "bootstrap: unknown profile $profile (runtime, test, bench or wheel)" >&2; exit 2 ;;
esac

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "bootstrap: installing system packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi

# Dependencies straight from pyproject.toml, so this list cannot drift from it.
deps=$(.venv/bin/python - "$profile" <<'PYEOF'
import sys, tomllib
meta = tomllib.load(open("pyproject.toml", "rb"))
deps = list(meta["build-system"]["requires"]) + list(meta["project"]["dependencies"])
extras = meta["project"]["optional-dependencies"]
if sys.argv[1] in ("test", "bench"):
    deps += extras["test"] + extras["bench"]
if sys.argv[1] in ("test", "wheel"):
    deps += extras["wheel"]
print("\n".join(deps))
PYEOF
)
stamp=.venv/.deps-$profile-$(printf '%s' "$deps" | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "bootstrap: installing Python packages ($profile)"
  .venv/bin/python -m pip install -q --upgrade pip
  printf '%s\n' "$deps" > .venv/requirements-$profile.txt
  .venv/bin/python -m pip install -q -r .venv/requirements-$profile.txt
  touch "$stamp"
fi

echo "bootstrap: building the compiled core"
flock /tmp/konnectivity-fast-build.lock .venv/bin/python setup.py -q build_ext --inplace 2>&1 \
  | grep -v -E '^(running|copying|building|creating)' || true
.venv/bin/python -c "import konnectivity_fast._wire" \
  || { echo "bootstrap: the compiled core does not import" >&2; exit 1; }
# The editable install provides the console scripts: redo it when pyproject.toml changes.
install_stamp=.venv/.install-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$install_stamp" ]; then
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
    || .venv/bin/python -m pip install --no-deps --no-build-isolation -e .
  touch "$install_stamp"
fi
