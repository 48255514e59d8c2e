"""Command-line entry points. ``main``: the ``konnectivity-fast`` tool (what upstream
lacks: a wire demo, version and build information)."""
