"""TVM (untuned and tuned) against PyTorch eager and ONNX Runtime, side by side in one run.

    python bench/bench_peers.py                       # resnet18 and mobilenet_v2 on `local`
    python bench/bench_peers.py --tune-budget 30      # tune first where no records exist
    python bench/bench_peers.py --json                # the same rows as JSON on stdout

Every model is batch 1, fp32, with edgekit's seeded random weights and input. TVM runs on the
device (the local daemon by default) and is timed there with `time_evaluator`; PyTorch and ONNX
Runtime run in this process with the same thread count. The engines are timed in interleaved
rounds, so a neighbour's load on a shared machine falls on all of them alike: the ratios are what
count, the absolute figures move with the machine. Every engine's outputs go through deploy's
check against PyTorch (`hostkit.run.check`: relative error within rtol); a row that fails it gets
no ratio and fails the run. Tuning, when asked for, happens before the timing session opens, so a
30-minute tune never outlives the session. The run fails (exit 1) when a check fails or a target
below is missed (targets only with --no-floor off).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

# Targets: tuned TVM latency over the peer's, per model (lower is better).
TARGETS: dict[str, dict[str, float]] = {
    "resnet18": {"pytorch": 0.8, "onnxruntime": 1.0},
    "mobilenet_v2": {"pytorch": 0.6},
}
ENGINES = ("tvm-untuned", "tvm-tuned", "pytorch", "onnxruntime")


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


def _torch_timer(model: Any, threads: int) -> Callable[[int], list[float]]:
    import torch

    torch.set_num_threads(threads)
    module = model._module
    x = torch.from_numpy(model.inputs[0])

    def run(n: int) -> list[float]:
        out = []
        with torch.inference_mode():
            for _ in range(n):
                start = time.perf_counter()
                module(x)
                out.append((time.perf_counter() - start) * 1e3)
        return out

    return run


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


def tune_missing(name: str, args: argparse.Namespace, device: Any, resolved: Any,
                 log: Callable[[str], None]) -> str | None:
    """Tune `name` when it has no records and a budget was given; a note for its tuned row.

    Runs before the timing session opens: a session held open across a long tune expired at its
    limit and ended the bench with a traceback.
    """
    from hostkit.build.tuning.records import records_for
    from hostkit.models import ModelSpec, load_model
    from hostkit.run.tune import tune_on_device

    spec = ModelSpec(name)
    if args.tune_budget <= 0 or records_for(load_model(spec), resolved).exists():
        return None
    log(f"{name}: no records, tuning for up to {args.tune_budget:g} min")
    from rich.console import Console

    summary = tune_on_device(device, spec, trials=args.trials, trials_per_task=None,
                             time_budget_min=args.tune_budget, console=Console(stderr=True))
    return f"tuned now: {summary['valid_trials']} trials in {summary['tune_s'] / 60:.1f} min"


def bench_model(name: str, args: argparse.Namespace, device: Any, session: Any, resolved: Any,
                cross_cc: str | None, workdir: Path, log: Callable[[str], None],
                tuned_note: str | None) -> list[Row]:
    from hostkit.build.tuning.records import records_for
    from hostkit.models import ModelSpec, load_model

    model = load_model(ModelSpec(name))
    reference = model.reference()
    threads = args.threads or int(session.info().get("cores") or os.cpu_count() or 1)
    rows = {e: Row(model=name, engine=e) for e in ENGINES}
    timers: dict[str, Callable[[int], list[float]]] = {}

    log(f"{name}: building untuned")
    timers["tvm-untuned"], _ = _tvm_timer(session, model, resolved, cross_cc, None, device,
                                          rows["tvm-untuned"], reference)

    records = records_for(model, resolved)
    rows["tvm-tuned"].note = tuned_note or ""
    if not records.exists():
        rows["tvm-tuned"].note = "no records (pass --tune-budget to tune)"
    else:
        log(f"{name}: building tuned ({records.count()} records)")
        timers["tvm-tuned"], artifact = _tvm_timer(session, model, resolved, cross_cc, records,
                                                   device, rows["tvm-tuned"], reference)
        rows["tvm-tuned"].note = rows["tvm-tuned"].note or f"{records.count()} records"
        if not artifact.tuned:
            rows["tvm-tuned"].note += "; records did not apply"
        else:
            rows["tvm-tuned"].note += f"; {artifact.tuned_kernels} kernels tuned"

    timers["pytorch"] = _torch_timer(model, threads)
    rows["pytorch"].rel_err = 0.0
    rows["pytorch"].note = f"{threads} threads"
    try:
        timers["onnxruntime"] = _ort_timer(model, threads, workdir, rows["onnxruntime"],
                                           reference)
        rows["onnxruntime"].note = f"{threads} threads"
    except Exception as exc:  # no exporter or ORT build: the row says why, the others still run
        rows["onnxruntime"].note = f"unavailable: {str(exc).splitlines()[0][:120]}"

    time_interleaved(name, args, timers, rows)
    return list(rows.values())


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


def ratios(rows: list[Row]) -> list[dict[str, Any]]:
    """Tuned TVM over each peer, per model, with the target and whether it is met."""
    out = []
    by = {(r.model, r.engine): r for r in rows}
    for model in dict.fromkeys(r.model for r in rows):
        tuned = by.get((model, "tvm-tuned"))
        for peer in ("pytorch", "onnxruntime"):
            other = by.get((model, peer))
            if tuned is None or other is None or not tuned.p50_ms or not other.p50_ms:
                continue
            if tuned.check_failed or other.check_failed:
                continue  # a ratio to an engine that computed something else means nothing
            ratio = tuned.p50_ms / other.p50_ms
            target = TARGETS.get(model, {}).get(peer)
            out.append({"model": model, "peer": peer, "ratio": round(ratio, 3), "target": target,
                        "met": None if target is None else ratio <= target})
    return out


def render(rows: list[Row], checks: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 140)  # a log file gets whole notes
    table = Table(title=f"batch 1 fp32 on {meta['device']} ({meta['cpu']}, {meta['threads']} "
                        "threads), one run, interleaved rounds")
    for col in ("model", "engine", "p50 ms", "mean ms", "n", "vs PyTorch", "rel err", "note"):
        table.add_column(col, justify="right" if col.endswith(("ms", "n", "PyTorch")) else "left")
    torch_p50 = {r.model: r.p50_ms for r in rows if r.engine == "pytorch"}
    for r in rows:
        base = torch_p50.get(r.model)
        rel = f"{r.p50_ms / base:.2f}x" if r.p50_ms and base else "-"
        table.add_row(r.model, r.engine, f"{r.p50_ms:.2f}" if r.p50_ms else "-",
                      f"{r.mean_ms:.2f}" if r.mean_ms else "-", str(r.n), rel,
                      f"{r.rel_err:.1e}" if r.rel_err is not None else "-",
                      f"[red]check failed: {r.check_failed}[/red]" if r.check_failed else r.note)
    console.print(table)
    for c in checks:
        mark = "-" if c["met"] is None else ("[green]met[/green]" if c["met"] else "[red]missed[/red]")
        target = f"target <= {c['target']}" if c["target"] is not None else "no target"
        console.print(f"{c['model']}: tuned TVM / {c['peer']} = {c['ratio']:.2f} ({target}) {mark}")
    console.print("legend: p50/mean of per-inference latencies; vs PyTorch = p50 over PyTorch's "
                  "p50 (lower is faster); rel err = max abs diff from PyTorch over PyTorch's "
                  "largest output magnitude (deploy's check)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("models", nargs="*", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--device", default="local")
    parser.add_argument("--inventory", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=0, help="default: the device's cores")
    parser.add_argument("--repeat", type=int, default=20, help="inferences per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--tune-budget", type=float, default=0.0, metavar="MINUTES",
                        help="tune models without records for up to this long each (0: never)")
    parser.add_argument("--trials", type=int, default=20000,
                        help="trial cap when tuning (the budget usually ends it first)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--no-floor", action="store_true", help="exit 0 even if a target is missed")
    args = parser.parse_args(argv)

    bench = bench_device(args.device, args.inventory)
    device, resolved, cross_cc = bench.device, bench.resolved, bench.cross_cc
    notes = {name: tune_missing(name, args, device, resolved, log) for name in args.models}
    rows: list[Row] = []
    with bench_session(bench):
        for name in args.models:
            rows.extend(bench_model(name, args, device, bench.session, resolved, cross_cc,
                                    bench.workdir, log, notes[name]))
    info = bench.info
    checks = ratios(rows)
    meta = {"device": device.name, "cpu": info.get("cpu"),
            "threads": args.threads or info.get("cores")}
    if args.json:
        records = [{k: v for k, v in asdict(r).items() if k != "samples"} for r in rows]
        print(json.dumps({"meta": meta, "rows": records, "ratios": checks}, indent=2))
    else:
        render(rows, checks, meta)
    failed = [r for r in rows if r.check_failed]
    for r in failed:
        print(f"bench: {r.model} on {r.engine}: {r.check_failed}", file=sys.stderr)
    missed = [c for c in checks if c["met"] is False]
    return 1 if failed or (missed and not args.no_floor) else 0


if __name__ == "__main__":
    sys.exit(main())
