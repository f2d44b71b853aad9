"""Tuning: MetaSchedule's search for fast kernels (`search`) and the records it leaves (`records`).

The records are what deploy applies; the search is what `edgekit tune` runs, through a runner the
run stage gives it (`hostkit.run.tune`). Both share one Relax preparation, so every tuned kernel
is found again at build time.
"""
