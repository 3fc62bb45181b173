"""Tools around the library, run from the repository root as modules: the benchmark (`python -m tools.bench`), the
trainer's speed matrix (`python -m tools.trainer_speed`), the adapter micro-benchmark (`python -m tools.bench_adapter`)
and the default-asset generator (`python -m tools.make_default_assets`). Not shipped in the wheel."""
