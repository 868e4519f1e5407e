"""`r2m bench`: the fused kernels against the eager formula, and R2M's update against a full
reward-model update (docs/design.md §6).

    sizes.py      the benchmark sizes
    cases.py      what is timed: one Case per (op, size, backend)
    rm_update.py  the full reward-model update beside R2M's
    measure.py    timers, the read bandwidth, peak memory
    read_kernel.py  the Triton read kernel that measures the bandwidth
    report.py     rows, derived columns, tables, CSV, JSON, plots
    run.py        the run: every case, then the report

The command line is r2m.cli.bench.
"""
