"""Process-level benchmarks (``python -m bench.echo``) and micro-benchmarks (``bench/micro``)."""
