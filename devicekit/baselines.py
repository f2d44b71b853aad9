"""Baseline engines on the device: the model TVM runs, run again in PyTorch and in ONNX Runtime.

The question a user asks of a compiled model is whether it beats what they would otherwise run on
the same board, so the baselines run here, on the device, with TVM's protocol: `warmup` runs
discarded, then `repeat` runs timed one inference each. PyTorch loads the host's exported program
(`.pt2`, no Python model code needed here) and ONNX Runtime the host's ONNX export.

Neither engine is a dependency of devicekit (`pip install 'edgekit[baselines]'` adds them): each is
imported only when the host asks for it, inside the RPC session's own process. An engine that is
not installed is reported as such (`n/a`), one that is installed but broken or fails on the model
as `failed` with its reason, and neither ever raises into TVM's RPC server.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from devicekit.info import compute_threads

__all__ = ["ENGINES", "FORMATS", "probe", "run"]

# Engine name -> the module it needs and the model file format the host sends it.
ENGINES = {"torch": "torch", "onnxruntime": "onnxruntime"}
FORMATS = {"torch": ".pt2", "onnxruntime": ".onnx"}


def probe(engine: str) -> dict[str, Any]:
    """Whether this device can run `engine`: status ok (with its version), n/a or failed."""
    if engine not in ENGINES:
        return {"engine": engine, "status": "failed",
                "reason": f"unknown engine {engine!r}; this device knows {', '.join(ENGINES)}"}
    module_name = ENGINES[engine]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] == module_name:
            return {"engine": engine, "status": "n/a", "reason": "not installed"}
        return {"engine": engine, "status": "failed",
                "reason": f"importing {module_name} failed: {_line(exc)}"}
    except Exception as exc:  # an installed but broken engine: a missing library, a bad build
        return {"engine": engine, "status": "failed",
                "reason": f"importing {module_name} failed: {_line(exc)}"}
    return {"engine": engine, "status": "ok", "version": str(getattr(module, "__version__", "?"))}


def run(engine: str, model: Path, inputs: Path, outputs: Path, repeat: int, warmup: int,
        threads: int = 0) -> dict[str, Any]:
    """Load `model` in `engine`, run it once on the inputs (an .npz of arrays in input order),
    save its outputs to `outputs` (an .npz, flattened in order), then time `warmup` + `repeat`
    runs; returns the timings, or status failed with the reason."""
    found = probe(engine)
    if found["status"] != "ok":
        return found
    threads = threads or compute_threads()  # as many as TVM's kernels get
    try:
        with np.load(inputs) as archive:
            arrays = [archive[f"arr_{i}"] for i in range(len(archive.files))]
        start = time.perf_counter()
        runner = _torch_runner if engine == "torch" else _ort_runner
        call = runner(model, arrays, threads)
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        first = call()
        first_ms = (time.perf_counter() - start) * 1e3
        np.savez(outputs, *first)
        samples = []
        for _ in range(warmup + repeat):
            start = time.perf_counter()
            call()
            samples.append((time.perf_counter() - start) * 1e3)
    except Exception as exc:
        return {"engine": engine, "status": "failed", "version": found["version"],
                "reason": f"{engine} on the device: {_line(exc)}"}
    return {"engine": engine, "status": "ok", "version": found["version"], "threads": threads,
            "load_s": load_s, "first_inference_ms": first_ms, "samples_ms": samples[warmup:]}


def _torch_runner(model: Path, arrays: list[np.ndarray],
                  threads: int) -> Callable[[], list[np.ndarray]]:
    import torch

    from devicekit.torch_ops import register_ops

    torch.set_num_threads(threads)
    register_ops()  # a detector's program holds edgekit's and torchvision's operators
    module = torch.export.load(str(model)).module()
    tensors = [torch.from_numpy(a) for a in arrays]

    def call() -> list[np.ndarray]:
        with torch.inference_mode():
            out = module(*tensors)
        return [t.detach().cpu().numpy() for t in _flatten(out)]

    return call


def _ort_runner(model: Path, arrays: list[np.ndarray],
                threads: int) -> Callable[[], list[np.ndarray]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(arrays):
        raise ValueError(f"the ONNX model takes {len(names)} inputs, the host sent {len(arrays)}")
    feed = dict(zip(names, arrays))

    def call() -> list[np.ndarray]:
        return [np.asarray(o) for o in session.run(None, feed)]

    return call


def _flatten(value: Any) -> list[Any]:
    """Outputs in the order the host's reference flattens them (tuples, lists, dict values)."""
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in _flatten(item)]
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in _flatten(item)]
    return [value]


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first[:300]}" if first else type(exc).__name__
