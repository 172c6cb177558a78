"""Benchmarks: commands that print a table next to the reference implementation and the bandwidth ceiling,
and write JSON. Run `python -m qvl_pipeline.bench --help`."""
