"""The names of the compared methods: what `eval.methods` and `bench.methods` may list (kept
apart from `lessctl.methods` so the config schema checks them without importing the models)."""

METHODS = ("full", "baseline", "baseline_plus", "less", "performer")
BENCH_METHODS = ("full", "baseline", "less")
