"""Helpers for the host-side benchmarks that time engines in interleaved rounds (`bench_int8.py`).

TVM runs on the device (timed there with `time_evaluator`), ONNX Runtime in this process; every
engine's outputs go through deploy's check against PyTorch (`hostkit.run.check`). Comparing TVM
with PyTorch and ONNX Runtime *on the device* is `edgekit bench --baselines` (`bench_peers.py`);
these helpers remain for int8 against ONNX Runtime's own int8 quantization, which no device-side
baseline covers.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np


@dataclass
class Row:
    model: str
    engine: str
    p50_ms: float | None = None
    mean_ms: float | None = None
    n: int = 0
    rel_err: float | None = None
    check_failed: str | None = None
    note: str = ""
    samples: list[float] = field(default_factory=list, repr=False)


def _local_device(name: str, inventory: Path | None) -> Any:
    from hostkit.cli import BUILTIN_INVENTORY
    from hostkit.inventory import load_inventory, parse_inventory

    inv = load_inventory(inventory) if inventory else parse_inventory(BUILTIN_INVENTORY)
    return inv.get(name)


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


@dataclass
class Bench:
    """The device a bench runs on, with its target and an open session (see `bench_session`)."""

    device: Any
    resolved: Any
    cross_cc: str | None
    session: Any = None
    info: dict[str, Any] = field(default_factory=dict)
    workdir: Path = Path(".")


def bench_device(name: str, inventory: Path | None) -> Bench:
    from hostkit.build.targets import check_cross_compiler, resolve_target

    device = _local_device(name, inventory)
    resolved = resolve_target(device)
    return Bench(device, resolved, check_cross_compiler(device, resolved))


@contextlib.contextmanager
def bench_session(bench: Bench) -> Iterator[Bench]:
    """One RPC session to the device (its TVM version checked) and a scratch folder."""
    from hostkit.run.remote import DeviceSession, check_versions
    from hostkit.transport import make_transport

    with make_transport(bench.device) as transport, tempfile.TemporaryDirectory() as tmp:
        bench.session = DeviceSession(transport, transport.session())
        bench.info = bench.session.info()
        check_versions(bench.device.name, bench.info)
        bench.workdir = Path(tmp)
        try:
            yield bench
        finally:
            bench.session.close()



def _check(row: Row, outputs: list[np.ndarray], reference: list[np.ndarray]) -> None:
    """The same check deploy makes: relative error against PyTorch within rtol."""
    from hostkit.run.check import compare_outputs

    check = compare_outputs(outputs, reference)
    row.rel_err = check.rel_err
    if not check.passed():
        row.check_failed = check.reason()


def _ort_timer(model: Any, threads: int, workdir: Path,
               row: Row, reference: list[np.ndarray]) -> Callable[[int], list[float]]:
    import onnxruntime as ort
    import torch

    path = workdir / f"{model.name}.onnx"
    x = torch.from_numpy(model.inputs[0])
    torch.onnx.export(model._module, (x,), str(path), dynamo=False, input_names=["x"],
                      opset_version=17)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"x": model.inputs[0]}
    _check(row, list(session.run(None, feed)), reference)
    return ort_timer(session, feed)


def ort_timer(session: Any, feed: dict[str, np.ndarray]) -> Callable[[int], list[float]]:
    """Per-inference wall times (ms) of an ONNX Runtime session, one call per sample."""

    def run(n: int) -> list[float]:
        out = []
        for _ in range(n):
            start = time.perf_counter()
            session.run(None, feed)
            out.append((time.perf_counter() - start) * 1e3)
        return out

    return run


def _tvm_timer(session: Any, model: Any, resolved: Any, cross_cc: str | None, tuning: Any,
               device: Any, row: Row,
               reference: list[np.ndarray]) -> tuple[Callable[[int], list[float]], Any]:
    from hostkit.build.compiler import build_artifact

    artifact = build_artifact(model, resolved, fmt=device.format, cross_compiler=cross_cc,
                              tuning=tuning, device=device.name)
    session.ensure_artifact(artifact.path, artifact.sha256)
    loaded = session.load(artifact.sha256)
    outputs, _ = loaded.run(model.inputs)
    _check(row, outputs, reference)

    def run(n: int) -> list[float]:
        return loaded.benchmark(n, 0)

    return run, artifact


def time_interleaved(name: str, args: argparse.Namespace,
                     timers: dict[str, Callable[[int], list[float]]], rows: dict[str, Row]) -> None:
    """Warm every engine up, then time them in interleaved rounds, so load falls on all alike."""
    for timer in timers.values():  # first calls pay for lazy set-up
        timer(args.warmup)
    log(f"{name}: timing {args.rounds} interleaved rounds of {args.repeat}")
    for _ in range(args.rounds):
        for engine, timer in timers.items():
            rows[engine].samples.extend(timer(args.repeat))
    for row in rows.values():
        if row.samples:
            row.n = len(row.samples)
            row.p50_ms = statistics.median(row.samples)
            row.mean_ms = statistics.fmean(row.samples)

