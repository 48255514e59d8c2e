"""Compatibility tests against the upstream v0.36.0 binaries themselves (built from the Go
module proxy by scripts/build-upstream.sh): the golden flag and metric lists under
tests/data/ are checked against what upstream really registers and exposes, and our
programs' help and metrics against upstream's."""
