"""Report: result records (`results`), how they are shown (`render`: rich tables, JSON, CSV), and
the regression gate between two runs' records (`compare`).

The run stage fills the records; rendering decides nothing, so every renderer is a plain function
of the records and can be tested by rendering into a string. `compare` is the one judgement here:
whether a new run is slower or less accurate than an old one, beyond the noise.
"""
