"""int8 against fp32, built the same way, on the same device, in one run; ONNX Runtime beside them.

    python bench/bench_int8.py                        # mobilenet_v2 and resnet18 on `local`
    python bench/bench_int8.py --calibration 64 --json

TVM fp32 and TVM int8 are built alike: both untuned, or both with tuning records when both have
them (`edgekit tune ... [--quantize int8]`). Untuned builds are compiled for the device's CPU
(`mcpu`, as tuning does), so both precisions get its vector extensions and int8 its VNNI kernels;
`--inventory-target` builds for the inventory's target as it stands instead. ONNX Runtime runs
the fp32 model and its own static int8 QDQ quantization of it, calibrated on the same samples.
Every engine's outputs go through deploy's check against its PyTorch reference (fp32, or
PyTorch's quantized model for TVM int8).
Engines are timed in interleaved rounds; the ratios are what count. Targets (issue 11): TVM int8
at or below 0.6x TVM fp32; TVM int8 MobileNetV2 below ONNX Runtime int8. Exit 1 when a check
fails, or a target is missed unless --no-floor.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
from common import (
    Row,
    _ort_timer,
    _tvm_timer,
    bench_device,
    bench_session,
    log,
    ort_timer,
    time_interleaved,
)

TARGETS = {"int8/fp32": 0.6}


def _ort_int8_timer(model: Any, samples: list[np.ndarray], threads: int, workdir: Path,
                    row: Row, reference: list[np.ndarray]) -> Callable[[int], list[float]]:
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    fp32 = workdir / f"{model.name}.onnx"
    if not fp32.exists():
        torch.onnx.export(model._module, (torch.from_numpy(model.inputs[0]),), str(fp32),
                          dynamo=False, input_names=["x"], opset_version=17)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"x": s} for s in samples])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    int8 = workdir / f"{model.name}.int8.onnx"
    quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"])
    feed = {"x": model.inputs[0]}
    outputs = list(session.run(None, feed))
    agree = float(np.mean([np.argmax(o) == np.argmax(r) for o, r in zip(outputs, reference)]))
    row.rel_err = None
    row.note = f"ORT static QDQ, top-1 vs fp32 {'same' if agree == 1.0 else 'differs'}"
    return ort_timer(session, feed)


def cpu_target(resolved: Any, info: dict[str, Any]) -> Any:
    """The inventory's target with the device's `mcpu` and core count, as tuning completes it."""
    from hostkit.build.targets import ResolvedTarget
    from hostkit.build.tuning.records import device_target

    target = device_target(resolved, info)
    return ResolvedTarget(target=target, triple=resolved.triple, kind=resolved.kind)


def bench_model(name: str, args: argparse.Namespace, device: Any, session: Any, resolved: Any,
                cross_cc: str | None, workdir: Path, log: Callable[[str], None],
                untuned: Any = None) -> list[Row]:
    from hostkit.build.tuning.records import records_for
    from hostkit.models import ModelSpec, load_model
    from hostkit.models.quantize import calibration_samples, quantize_int8

    fp32 = load_model(ModelSpec(name))
    samples = calibration_samples(str(args.calibration), fp32, None)
    int8, info = quantize_int8(fp32, samples, args.method)
    fp32_ref, int8_ref = fp32.reference(), int8.reference()
    threads = int(session.info().get("cores") or os.cpu_count() or 1)
    fp32_records, int8_records = records_for(fp32, resolved), records_for(int8, resolved)
    tuned = fp32_records.exists() and int8_records.exists()
    how = "tuned" if tuned else "untuned"
    build = resolved if tuned or untuned is None else untuned
    rows = {e: Row(model=name, engine=e) for e in
            (f"tvm-fp32-{how}", f"tvm-int8-{how}", "onnxruntime-fp32", "onnxruntime-int8")}
    timers: dict[str, Callable[[int], list[float]]] = {}
    log(f"{name}: building fp32 and int8 ({how}, {build.describe()})")
    timers[f"tvm-fp32-{how}"], _ = _tvm_timer(session, fp32, build, cross_cc,
                                              fp32_records if tuned else None, device,
                                              rows[f"tvm-fp32-{how}"], fp32_ref)
    timers[f"tvm-int8-{how}"], artifact = _tvm_timer(session, int8, build, cross_cc,
                                                     int8_records if tuned else None, device,
                                                     rows[f"tvm-int8-{how}"], int8_ref)
    vnni = (artifact.int8 or {}).get("vnni_layers", 0)
    rows[f"tvm-int8-{how}"].note = (f"{info.layers} layers int8 ({vnni} on VNNI), calibration "
                                    f"{info.method} on {info.samples}, top-1 vs fp32 "
                                    f"{info.vs_fp32_top1:.0%}")
    timers["onnxruntime-fp32"] = _ort_timer(fp32, threads, workdir, rows["onnxruntime-fp32"],
                                            fp32_ref)
    try:
        timers["onnxruntime-int8"] = _ort_int8_timer(fp32, samples, threads, workdir,
                                                     rows["onnxruntime-int8"], fp32_ref)
    except Exception as exc:  # the row says why; the others still run
        rows["onnxruntime-int8"].note = f"unavailable: {str(exc).splitlines()[0][:120]}"
    time_interleaved(name, args, timers, rows)
    return list(rows.values())


def ratios(rows: list[Row]) -> list[dict[str, Any]]:
    out = []
    by = {(r.model, r.engine.rsplit("-", 1)[0] if r.engine.startswith("tvm") else r.engine): r
          for r in rows}
    for model in dict.fromkeys(r.model for r in rows):
        pairs = [("tvm-int8", "tvm-fp32", "int8/fp32"),
                 ("tvm-int8", "onnxruntime-int8", "tvm int8/ort int8")]
        for a, b, label in pairs:
            x, y = by.get((model, a)), by.get((model, b))
            if not x or not y or not x.p50_ms or not y.p50_ms or x.check_failed or y.check_failed:
                continue
            ratio = x.p50_ms / y.p50_ms
            target = TARGETS.get(label, 1.0 if model == "mobilenet_v2" else None)
            out.append({"model": model, "ratio_of": label, "ratio": round(ratio, 3),
                        "target": target, "met": None if target is None else ratio <= target})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("models", nargs="*", default=["mobilenet_v2", "resnet18"])
    parser.add_argument("--device", default="local")
    parser.add_argument("--inventory", type=Path, default=None)
    parser.add_argument("--calibration", type=int, default=32)
    parser.add_argument("--method", choices=["minmax", "entropy"], default="minmax")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--no-floor", action="store_true")
    parser.add_argument("--inventory-target", action="store_true",
                        help="build untuned models for the inventory's target, without the "
                             "device's mcpu")
    args = parser.parse_args(argv)

    bench = bench_device(args.device, args.inventory)
    rows: list[Row] = []
    with bench_session(bench):
        untuned = None if args.inventory_target else cpu_target(bench.resolved, bench.info)
        for name in args.models:
            rows.extend(bench_model(name, args, bench.device, bench.session, bench.resolved,
                                    bench.cross_cc, bench.workdir, log, untuned))
    checks = ratios(rows)
    records = [{k: v for k, v in vars(r).items() if k != "samples"} for r in rows]
    if args.json:
        print(json.dumps({"rows": records, "ratios": checks}, indent=2))
    else:
        for r in records:
            p50 = f"{r['p50_ms']:.2f} ms" if r["p50_ms"] else "-"
            verdict = f" CHECK FAILED: {r['check_failed']}" if r["check_failed"] else ""
            print(f"{r['model']:14s} {r['engine']:24s} p50 {p50:>11s} n={r['n']:<3d} "
                  f"{r['note']}{verdict}")
        for c in checks:
            mark = "-" if c["met"] is None else ("met" if c["met"] else "missed")
            print(f"{c['model']}: {c['ratio_of']} = {c['ratio']:.2f} (target <= {c['target']}) "
                  f"{mark}")
    failed = [r for r in rows if r.check_failed]
    missed = [c for c in checks if c["met"] is False]
    return 1 if failed or (missed and not args.no_floor) else 0


if __name__ == "__main__":
    sys.exit(main())
