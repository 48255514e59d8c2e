"""Command-line entry points. ``main``: the ``konnectivity-fast`` tool (what upstream
lacks: the demo, the doctor, version and build information)."""
