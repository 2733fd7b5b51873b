"""Benchmarks (shipped as verm_local.benchmarks): agreement against the bf16 reference and
latency. The suites land with the benchmark issue; this package reserves the import name."""
