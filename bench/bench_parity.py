"""Time to parity: TVM's latency against minutes of tuning, beside PyTorch and ONNX Runtime.

    python bench/bench_parity.py                              # resnet18, mobilenet_v2; 0-30 min
    python bench/bench_parity.py tinycnn --minutes 0 1 2      # a quick look
    python bench/bench_parity.py --chart bench/time_to_parity.svg --json curve.json

Per model it tunes from no records (a cache of its own, unless `--cache` names one) in slices
up to each checkpoint of `--minutes` (cumulative; each slice resumes the records of the one
before), and at every checkpoint deploys TVM with the records so far and runs PyTorch and ONNX
Runtime beside it on the device (`edgekit bench --baselines torch,onnxruntime`: same protocol,
every engine checked against PyTorch), so each row's ratios are measured side by side; it does
so `--rounds` times in turn and keeps each engine's median p50 (one run at a time, a spell of
load on a shared machine moved one engine's figure by 40%). Minute 0 is the untuned build. It
prints the curve as a table, says after how many minutes of tuning TVM first reached each
engine's latency (or that it did not within the last checkpoint), and draws the curves as an
SVG chart. Tuning overruns a slice by up to one measured round, so the minutes
shown are the tuning actually done.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ENGINES = ("torch", "onnxruntime")
COLOURS = {"tvm": "#d62728", "torch": "#1f77b4", "onnxruntime": "#2ca02c"}


@dataclass
class Point:
    model: str
    minutes: float  # tuning done before this measurement
    trials: int  # valid trials measured so far
    tvm_ms: float | None
    torch_ms: float | None
    onnxruntime_ms: float | None
    tuned_kernels: str | None
    rel_err: float | None


def log(message: str) -> None:
    print(f"[parity] {message}", file=sys.stderr, flush=True)


def _p50(latency: Any) -> float | None:
    return None if latency is None else float(latency.p50)


def measure(device: Any, name: str, minutes: float, trials: int, args: argparse.Namespace) -> Point:
    """One point: `--rounds` runs of every engine in turn, each engine's median p50 over them,
    so a spell of load on the shared machine slows one round of each engine, not one engine."""
    from hostkit.models import ModelSpec
    from hostkit.run.deploy import RunOptions, run_on_device

    options = RunOptions(repeat=args.repeat, warmup=args.warmup, use_tuning=minutes > 0,
                         baselines=ENGINES)
    rounds: dict[str, list[float]] = {}
    errors: list[float] = []
    for _ in range(args.rounds):
        (result,) = run_on_device(device, [ModelSpec(name)], options)
        if not result.ok:
            raise SystemExit(f"bench_parity: {name} at {minutes:.1f} min: {result.error}")
        seen = {"tvm": _p50(result.latency_ms)} | {
            b.engine: (_p50(b.latency_ms) if b.status == "ok" else None)
            for b in result.baselines}
        for engine, ms in seen.items():
            if ms is not None:
                rounds.setdefault(engine, []).append(ms)
        if result.rel_err is not None:
            errors.append(result.rel_err)
    p50 = {engine: statistics.median(values) for engine, values in rounds.items()}
    return Point(name, round(minutes, 2), trials, p50.get("tvm"), p50.get("torch"),
                 p50.get("onnxruntime"), result.tuned_kernels, max(errors, default=None))


def curve(device: Any, name: str, args: argparse.Namespace) -> list[Point]:
    from hostkit.models import ModelSpec
    from hostkit.run.tune import tune_on_device

    points, tuned, trials = [], 0.0, 0
    for checkpoint in sorted(set(args.minutes)):
        if checkpoint > tuned:
            log(f"{name}: tuning {checkpoint - tuned:.1f} more min (to {checkpoint:g})")
            summary = tune_on_device(device, ModelSpec(name), trials=args.trials,
                                     trials_per_task=None, time_budget_min=checkpoint - tuned,
                                     console=None)
            tuned += float(summary["tune_s"]) / 60
            trials += int(summary.get("valid_trials") or 0)
        log(f"{name}: measuring after {tuned:.1f} min of tuning")
        points.append(measure(device, name, tuned, trials, args))
        log(f"{name}: {_row(points[-1])}")
    return points


def parity(points: list[Point], engine: str) -> str:
    """After how many minutes of tuning TVM's p50 first reached `engine`'s, measured in the
    same row."""
    for p in points:
        theirs = getattr(p, f"{engine}_ms")
        if p.tvm_ms is not None and theirs is not None and p.tvm_ms <= theirs:
            return f"after {p.minutes:g} min of tuning"
    last = points[-1].minutes if points else 0
    return f"not within {last:g} min"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}"


def _row(p: Point) -> str:
    return (f"TVM {_ms(p.tvm_ms)} ms, torch {_ms(p.torch_ms)}, onnxruntime "
            f"{_ms(p.onnxruntime_ms)} (TVM/torch {_ratio(p.tvm_ms, p.torch_ms)}, "
            f"TVM/ORT {_ratio(p.tvm_ms, p.onnxruntime_ms)})")


def table(points: list[Point]) -> str:
    lines = ["| model | tuning min | trials | TVM p50 ms | PyTorch p50 ms | ORT p50 ms | "
             "TVM / PyTorch | TVM / ORT | tuned kernels |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p.model} | {p.minutes:g} | {p.trials} | {_ms(p.tvm_ms)} | "
                     f"{_ms(p.torch_ms)} | {_ms(p.onnxruntime_ms)} | "
                     f"{_ratio(p.tvm_ms, p.torch_ms)} | {_ratio(p.tvm_ms, p.onnxruntime_ms)} | "
                     f"{p.tuned_kernels or '-'} |")
    return "\n".join(lines)


def chart(points: list[Point]) -> str:
    """An SVG with one panel per model: latency (ms) against minutes of tuning, per engine."""
    models = list(dict.fromkeys(p.model for p in points))
    width, height, pad = 420, 260, 48
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width * len(models)}" '
             f'height="{height + 30}" font-family="sans-serif" font-size="11">',
             f'<rect width="{width * len(models)}" height="{height + 30}" fill="white"/>']
    for index, model in enumerate(models):
        mine = [p for p in points if p.model == model]
        left = index * width
        top_ms = max(v for p in mine for v in (p.tvm_ms, p.torch_ms, p.onnxruntime_ms)
                     if v is not None) * 1.1
        last = max(p.minutes for p in mine) or 1.0

        def x(minutes: float) -> float:
            return left + pad + (width - 1.5 * pad) * minutes / last

        def y(ms: float) -> float:
            return height - pad + 10 - (height - 1.5 * pad) * ms / top_ms

        parts.append(f'<text x="{left + width / 2}" y="16" text-anchor="middle" '
                     f'font-weight="bold">{model}</text>')
        parts.append(f'<line x1="{x(0)}" y1="{y(0)}" x2="{x(last)}" y2="{y(0)}" stroke="black"/>')
        parts.append(f'<line x1="{x(0)}" y1="{y(0)}" x2="{x(0)}" y2="{y(top_ms)}" '
                     f'stroke="black"/>')
        for tick in range(5):
            ms = top_ms * tick / 4
            parts.append(f'<text x="{x(0) - 4}" y="{y(ms) + 4}" text-anchor="end">{ms:.1f}'
                         f'</text>')
        for p in mine:
            parts.append(f'<text x="{x(p.minutes)}" y="{y(0) + 14}" text-anchor="middle">'
                         f'{p.minutes:g}</text>')
        parts.append(f'<text x="{left + width / 2}" y="{height + 22}" text-anchor="middle">'
                     f'minutes of tuning (p50 latency, ms)</text>')
        for row, engine in enumerate(("tvm", *ENGINES)):
            series = [(p.minutes, getattr(p, f"{engine}_ms")) for p in mine]
            series = [(m, v) for m, v in series if v is not None]
            if not series:
                continue
            path = " ".join(f"{x(m):.1f},{y(v):.1f}" for m, v in series)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{COLOURS[engine]}" '
                         f'stroke-width="2"/>')
            parts += [f'<circle cx="{x(m):.1f}" cy="{y(v):.1f}" r="3" '
                      f'fill="{COLOURS[engine]}"/>' for m, v in series]
            label = {"tvm": "TVM (edgekit)", "torch": "PyTorch", "onnxruntime": "ONNX Runtime"}
            parts.append(f'<text x="{left + width - 12}" y="{34 + 14 * row}" text-anchor="end" '
                         f'fill="{COLOURS[engine]}">{label[engine]}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("models", nargs="*", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--minutes", type=float, nargs="+", default=[0, 2, 5, 10, 20, 30],
                        help="checkpoints, in cumulative minutes of tuning (0: untuned)")
    parser.add_argument("--device", default="local")
    parser.add_argument("--inventory", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=50, help="timed inferences per engine")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs of every engine per point; each engine's median counts")
    parser.add_argument("--trials", type=int, default=20000,
                        help="trial cap per slice (the clock usually ends it first)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="edgekit's cache to tune into (default: a new one, no records)")
    parser.add_argument("--chart", type=Path, default=None, help="write the curves as SVG")
    parser.add_argument("--json", type=Path, default=None, help="write the points as JSON")
    parser.add_argument("--replot", type=Path, nargs="+", default=None, metavar="JSON",
                        help="measure nothing: the table and chart of earlier runs' --json files")
    args = parser.parse_args(argv)
    if any(m < 0 for m in args.minutes):
        parser.error("--minutes must not be negative")
    if args.replot:
        points = [Point(**row) for path in args.replot
                  for row in json.loads(path.read_text(encoding="utf-8"))]
        report(points, list(dict.fromkeys(p.model for p in points)), args)
        return 0

    cache = args.cache or Path(tempfile.mkdtemp(prefix="edgekit-parity-"))
    os.environ["EDGEKIT_CACHE"] = str(cache)  # before hostkit reads it
    log(f"tuning records and artifacts in {cache}")
    from hostkit.cli import BUILTIN_INVENTORY
    from hostkit.inventory import load_inventory, parse_inventory

    inventory = load_inventory(args.inventory) if args.inventory else parse_inventory(
        BUILTIN_INVENTORY)
    device = inventory.get(args.device)
    points = []
    for name in args.models:
        points += curve(device, name, args)
        if args.json:  # after each model: a later model's failure keeps the earlier curves
            args.json.write_text(json.dumps([asdict(p) for p in points], indent=2),
                                 encoding="utf-8")
    report(points, args.models, args)
    return 0


def report(points: list[Point], models: list[str], args: argparse.Namespace) -> None:
    print(table(points))
    print()
    for name in models:
        mine = [p for p in points if p.model == name]
        print(f"{name}: TVM reached PyTorch {parity(mine, 'torch')}; ONNX Runtime "
              f"{parity(mine, 'onnxruntime')}")
    if args.chart:
        args.chart.write_text(chart(points), encoding="utf-8")
        log(f"chart: {args.chart}")


if __name__ == "__main__":
    sys.exit(main())
