"""Benchmarks (shipped as verm_local.benchmarks): labelled data (`data`), agreement with
the reference and the human labels (`agreement`, `matcher`, `metrics`, `kld`), latency
(`latency` runs it: `latency_runs` the workload and its runners, `latency_summary` the
ratios the CI gate reads, `latency_report` the tables and plot; `gate` decides), the
serving engine against llama-server (`serve`)."""
