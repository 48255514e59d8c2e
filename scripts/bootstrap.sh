#!/usr/bin/env bash
# Set up everything konnectivity-fast needs on a fresh Debian machine, idempotently:
# system packages (libnghttp2-dev for the compiled core), a virtualenv in .venv with the
# runtime and test dependencies, and an in-place build of the compiled extension.
# Usage: scripts/bootstrap.sh            (runtime + test dependencies)
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(libnghttp2-dev pkg-config gcc make)

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
  echo "bootstrap: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.deps-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "bootstrap: installing Python packages"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  touch "$stamp"
fi
echo "bootstrap: building the compiled core"
.venv/bin/python setup.py -q build_ext --inplace
