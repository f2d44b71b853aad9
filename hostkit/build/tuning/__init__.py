"""Tuning: MetaSchedule's search for fast kernels (`search`) and the records it leaves (`records`).

The records are what deploy applies; the search is what `edgekit tune` runs, through a runner the
run stage gives it (`hostkit.run.tune`). Both share one Relax preparation, so every tuned kernel
is found again at build time. Records move between hosts as one checked file (`exchange`), and a
tune starts from other models' records of the same kernels (`share`).
"""
