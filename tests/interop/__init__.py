"""Interoperation with the upstream Go peers: our programs with upstream's proxy-agent and
the konnectivity-client library (goclient), real processes, bytes through the tunnel.
goclient/ is the Go dialer peer's source (built by scripts/build-upstream.sh)."""
