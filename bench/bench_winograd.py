"""One 3x3 convolution, direct against Winograd, each tuned with the same small budget.

    python bench/bench_winograd.py                     # ResNet-18's 64x56x56 and 256x14x14
    python bench/bench_winograd.py --trials 128 --shape 128x28x28
    python bench/bench_winograd.py --model resnet18   # the model, from `edgekit tune` records

A ResNet-18 conv block (3x3 stride-1 convolution, batch norm folded into a bias, ReLU) at one
shape, prepared the way `edgekit tune` prepares a model (NHWC, the same passes), once with the
convolution direct and once as Winograd (`hostkit.build.winograd`). Each is tuned from no records
with MetaSchedule's local runner, edgekit's search settings and `--trials` trials (the layout
transposes around it are left untuned in both), then built, checked against PyTorch and timed in
this process, the two builds in interleaved rounds, so their ratio holds on a shared machine.
GFLOP/s are of the direct convolution's work (2 x N x H x W x CO x CI x 9) for both, so they
compare as speed; `tuned_best_ms` is the kernel's best time while tuning (noisier: the two tunes
ran at different times).

`--model` compares whole models instead: the records of both preparations (`edgekit tune
--device local MODEL` and the same with `--winograd`, tuned beforehand with the same budget) built
and run on the device next to PyTorch eager and ONNX Runtime in this process, in interleaved
rounds, every output checked against PyTorch (`bench/common.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def log(message: str) -> None:
    print(f"[winograd] {message}", file=sys.stderr, flush=True)


def conv_block(channels: int, size: int) -> tuple[Any, Any]:
    import torch

    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                torch.nn.BatchNorm2d(channels), torch.nn.ReLU()).eval()
    with torch.no_grad():
        block[1].running_mean.uniform_(-0.5, 0.5)
        block[1].running_var.uniform_(0.5, 1.5)
    return block, torch.randn(1, channels, size, size)


def prepared(block: Any, example: Any, target: Any, preparation: str) -> Any:
    import torch

    from hostkit.build.relax_import import to_relax
    from hostkit.build.tuning.records import prepare_module

    with torch.no_grad():
        program = torch.export.export(block, (example,))
    return prepare_module(to_relax(program), target, preparation)


def tune(mod: Any, target: Any, trials: int, work_dir: Path) -> dict[str, Any]:
    """Tune the convolution's task into `work_dir`, unless its records hold `trials` already."""
    from tvm.s_tir import meta_schedule as ms

    from hostkit.build.tuning.records import TuningRecords
    from hostkit.build.tuning.search import (
        MIN_REPEAT_MS,
        REPEATS,
        extract_tasks,
        kernel_profile,
        run_tuner,
    )

    # The convolution alone: the layout transposes around it are the same in both builds.
    tasks = [t for t in extract_tasks(mod, target, "local") if "conv2d" in t.task_name]
    remaining = trials - TuningRecords(work_dir).count()
    tune_s = 0.0
    if remaining > 0:
        work_dir.mkdir(parents=True, exist_ok=True)
        runner = ms.runner.LocalRunner(evaluator_config=ms.runner.EvaluatorConfig(
            number=1, repeat=REPEATS, min_repeat_ms=MIN_REPEAT_MS, enable_cpu_cache_flush=False))
        started = time.monotonic()
        run_tuner(tasks, target, str(work_dir), remaining, None, None, None, runner, None,
                  "local", int(target.attrs.get("num-cores", 2)))
        tune_s = time.monotonic() - started
    (kernel,) = kernel_profile(tasks, str(work_dir))
    return {"trials": TuningRecords(work_dir).count(), "tune_s": round(tune_s, 1),
            "kernel": kernel["kernel"], "tuned_best_ms": kernel["best_ms"]}


def build(mod: Any, target: Any, work_dir: Path) -> tuple[Any, str]:
    import tvm

    from hostkit.build.tuning.records import apply_records

    with target:
        applied, coverage = apply_records(mod, work_dir)
    return tvm.relax.VirtualMachine(tvm.compile(applied, target), tvm.cpu()), str(coverage)


def time_side_by_side(vms: list[Any], data: Any, rounds: int = 10) -> list[float]:
    """Each module's median latency (ms) over `rounds` interleaved rounds of 10 x 3 runs."""
    import tvm

    samples: list[list[float]] = [[] for _ in vms]
    for _ in range(rounds):
        for vm, kept in zip(vms, samples):
            kept.extend(vm.time_evaluator("main", tvm.cpu(), number=10, repeat=3)(data).results)
    return [float(np.median(kept)) * 1e3 for kept in samples]


def model_side_by_side(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    import os

    import torch
    from common import Row, _ort_timer, _tvm_timer, bench_device, bench_session, time_interleaved

    from hostkit.build.tuning.records import PREPARATIONS, records_for
    from hostkit.models import ModelSpec, load_model

    bench = bench_device("local", None)
    model = load_model(ModelSpec(name))
    reference = model.reference()
    rows: dict[str, Row] = {}
    timers: dict[str, Any] = {}
    with bench_session(bench):
        threads = int(bench.info.get("cores") or os.cpu_count() or 1)
        for preparation in PREPARATIONS:
            records = records_for(model, bench.resolved, preparation)
            engine = f"tvm-{preparation}"
            rows[engine] = Row(model=name, engine=engine)
            timers[engine], artifact = _tvm_timer(
                bench.session, model, bench.resolved, bench.cross_cc,
                records if records.exists() else None, bench.device, rows[engine], reference)
            rows[engine].note = f"tuned {artifact.tuned_kernels}, {records.meta()}"
        rows["onnxruntime"] = Row(model=name, engine="onnxruntime")
        timers["onnxruntime"] = _ort_timer(model, threads, bench.workdir, rows["onnxruntime"],
                                           reference)
        torch.set_num_threads(threads)
        module, x = model._module, torch.from_numpy(model.inputs[0])
        rows["torch"] = Row(model=name, engine="torch", rel_err=0.0)

        def torch_timer(n: int) -> list[float]:
            out = []
            with torch.inference_mode():
                for _ in range(n):
                    start = time.perf_counter()
                    module(x)
                    out.append((time.perf_counter() - start) * 1e3)
            return out

        timers["torch"] = torch_timer
        time_interleaved(name, args, timers, rows)
    return [{k: v for k, v in vars(r).items() if k != "samples"} for r in rows.values()]


def main(argv: list[str] | None = None) -> int:
    from devicekit.info import compute_threads

    # TVM runs in this process here: every core, as the device daemon gives its sessions
    os.environ.setdefault("TVM_NUM_THREADS", str(compute_threads()))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", default=None,
                        help="CxHxW of the convolution (repeatable; default 64x56x56 and "
                             "256x14x14)")
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--keep", type=Path, default=None,
                        help="folder for the records (a second run re-times without tuning)")
    parser.add_argument("--model", default=None, help="compare this model's two tunes instead")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    if args.model:
        print(json.dumps(model_side_by_side(args.model, args), indent=2))
        return 0
    import torch

    from devicekit.info import device_info
    from hostkit.build.targets import resolve_target
    from hostkit.build.tuning.records import device_target
    from hostkit.cli import BUILTIN_INVENTORY
    from hostkit.inventory import parse_inventory

    resolved = resolve_target(parse_inventory(BUILTIN_INVENTORY).get("local"))
    target = device_target(resolved, device_info(with_gpus=False))
    log(f"target {target}")
    rows = []
    root = args.keep or Path(tempfile.mkdtemp(prefix="edgekit-winograd-"))
    for shape in args.shape or ["64x56x56", "256x14x14"]:
        import tvm

        from hostkit.build.tuning.records import PREPARATION, WINOGRAD

        channels, size, _ = (int(x) for x in shape.split("x"))
        block, example = conv_block(channels, size)
        with torch.no_grad():
            expected = block(example).numpy()
        flops = 2.0 * size * size * channels * channels * 9
        data = tvm.runtime.tensor(example.numpy())
        vms, found = [], []
        for preparation in (PREPARATION, WINOGRAD):
            mod = prepared(block, example, target, preparation)
            work_dir = root / f"{shape}-{preparation}"
            row = {"shape": shape, "preparation": preparation,
                   **tune(mod, target, args.trials, work_dir)}
            vm, row["coverage"] = build(mod, target, work_dir)
            out = vm["main"](data)
            out = (out if hasattr(out, "numpy") else out[0]).numpy()
            row["rel_err"] = float(np.abs(out - expected).max() / np.abs(expected).max())
            log(json.dumps(row))
            vms.append(vm)
            found.append(row)
        for row, ms in zip(found, time_side_by_side(vms, data)):
            row["p50_ms"] = round(ms, 4)
            row["gflops_direct_work"] = round(flops / ms / 1e6, 1)
        found[1]["winograd_over_direct"] = round(found[1]["p50_ms"] / found[0]["p50_ms"], 3)
        log(json.dumps(found))
        rows.extend(found)
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
