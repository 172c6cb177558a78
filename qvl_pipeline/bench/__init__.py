"""Benchmarks: commands that print a table (next to the memory-bandwidth ceiling and, for task=bench, the reference
implementation) and write JSON. `python -m qvl_pipeline task=bench` and `task=tune` run on the pieces here;
`python -m qvl_pipeline.bench.kernels --help` measures the CPU linear kernels torch offers."""
