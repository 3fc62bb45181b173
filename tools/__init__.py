"""Tools around the library, run from the repository root: the benchmark (`python -m tools.bench`), the adapter
micro-benchmark (`python -m tools.bench_adapter`) and the default-asset generator. Not shipped in the wheel."""
