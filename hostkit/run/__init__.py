"""Run: the pipeline that puts a model on a device and measures it.

`deploy` is deploy and bench for one device and the fleet fan-out over many (every pair ends as
one result, never halfway); `remote` is one RPC session's view of a device's daemon (load, run,
time on the device); `tune` connects the build's tuner to a device; `cpp` runs an export
bundle's C++ runner on a device beside the daemon (`--runtime cpp`); `baselines` runs the same
model in PyTorch and ONNX Runtime on the device beside TVM (`--baselines`). This is the stage that uses
every stage below it: models, build, export, transport.
"""
