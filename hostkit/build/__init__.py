"""Build: from a loaded model to a library the device loads, for the device's exact target.

`targets` turns an inventory target into a TVM target and finds the cross compiler that links for
it; `compiler` imports the exported program into Relax, applies tuning records and compiles,
caching each artifact by everything that can change it; `tuning/` is the search that makes those
records (`search`) and the records themselves (`records`). Nothing here talks to a device: the
tuner's runner is handed in by the run stage.
"""
