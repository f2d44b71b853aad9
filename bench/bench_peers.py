"""TVM (untuned and tuned) against PyTorch and ONNX Runtime, all three on the device.

    python bench/bench_peers.py                       # resnet18 and mobilenet_v2 on `local`
    python bench/bench_peers.py --device pi4          # on a board that has the engines
    python bench/bench_peers.py --tune-budget 30      # tune first where no records exist
    python bench/bench_peers.py --json                # the same rows as JSON on stdout

A thin use of `edgekit bench --baselines torch,onnxruntime` (`hostkit.run.baselines`): per model
(batch 1, fp32, edgekit's seeded weights and input) it deploys TVM untuned, then TVM with the
model's tuning records with PyTorch and ONNX Runtime run beside it on the device, every engine
timed there with the same protocol and checked against PyTorch like TVM. What it adds is the
targets below: tuned TVM's ratio to each engine, and exit 1 when a check fails or a target is
missed (unless --no-floor). Tuning, when asked for, happens before any session opens.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

# Targets: tuned TVM latency over the peer's, per model (lower is better).
TARGETS: dict[str, dict[str, float]] = {
    "resnet18": {"torch": 0.8, "onnxruntime": 1.0},
    "mobilenet_v2": {"torch": 0.6},
}
ENGINES = ("torch", "onnxruntime")


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _device(name: str, inventory: Path | None) -> Any:
    from hostkit.cli import BUILTIN_INVENTORY
    from hostkit.inventory import load_inventory, parse_inventory

    inv = load_inventory(inventory) if inventory else parse_inventory(BUILTIN_INVENTORY)
    return inv.get(name)


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



def bench_model(name: str, args: argparse.Namespace, device: Any) -> list[Any]:
    """TVM untuned, then TVM tuned (records applied when they exist) with the baselines."""
    from hostkit.models import ModelSpec
    from hostkit.run.deploy import RunOptions, run_on_device

    spec = ModelSpec(name)
    results = []
    for tuned in (False, True):
        log(f"{name}: TVM {'tuned, with torch and onnxruntime' if tuned else 'untuned'}")
        options = RunOptions(repeat=args.repeat, warmup=args.warmup, use_tuning=tuned,
                             baselines=ENGINES if tuned else ())
        (result,) = run_on_device(device, [spec], options)
        results.append(result)
    return results


def ratios(results: list[Any]) -> list[dict[str, Any]]:
    """Tuned TVM over each engine that matched PyTorch, with the target and whether it is met."""
    out = []
    for r in results:
        if not r.tuned:
            continue
        for b in r.baselines:
            if b.tvm_ratio is None:
                continue  # a ratio to an engine that did not run or computed something else
            target = TARGETS.get(r.model, {}).get(b.engine)
            out.append({"model": r.model, "peer": b.engine, "ratio": round(b.tvm_ratio, 3),
                        "target": target, "met": None if target is None else
                        b.tvm_ratio <= target})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("models", nargs="*", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--device", default="local")
    parser.add_argument("--inventory", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=50, help="timed inferences per engine")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--tune-budget", type=float, default=0.0, metavar="MINUTES",
                        help="tune models without records for up to this long each (0: never)")
    parser.add_argument("--trials", type=int, default=20000,
                        help="trial cap when tuning (the budget usually ends it first)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--no-floor", action="store_true", help="exit 0 even if a target is missed")
    args = parser.parse_args(argv)

    from hostkit.build.targets import resolve_target
    from hostkit.report.render import bench_table, to_json

    device = _device(args.device, args.inventory)
    resolved = resolve_target(device)
    for name in args.models:
        tune_missing(name, args, device, resolved, log)
    results = [r for name in args.models for r in bench_model(name, args, device)]
    checks = ratios(results)
    if args.json:
        print(to_json({"rows": [r.to_json() for r in results], "ratios": checks}))
    else:
        from rich.console import Console

        console = Console(width=None if sys.stdout.isatty() else 140)
        bench_table(console, results)
        for c in checks:
            mark = "-" if c["met"] is None else ("met" if c["met"] else "missed")
            target = f"target <= {c['target']}" if c["target"] is not None else "no target"
            console.print(f"{c['model']}: tuned TVM / {c['peer']} = {c['ratio']:.2f} ({target}) "
                          f"{mark}", markup=False)
    failed = [r for r in results if not r.ok]
    failed += [b for r in results for b in r.baselines if b.status == "failed"]
    for r in results:
        if not r.ok:
            log(f"{r.model} on TVM: {r.error}")
        for b in r.baselines:
            if b.status != "ok":
                log(f"{r.model} on {b.engine}: {b.status}: {b.reason}")
    missed = [c for c in checks if c["met"] is False]
    return 1 if failed or (missed and not args.no_floor) else 0


if __name__ == "__main__":
    sys.exit(main())
