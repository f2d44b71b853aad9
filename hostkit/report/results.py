"""Result records: one per (device, model). Rendering lives in `report`; `--json` emits these."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = ["Latency", "RunResult", "CppRun", "Baseline"]


@dataclass(frozen=True)
class Latency:
    p50: float
    p90: float
    mean: float
    std: float
    n: int

    @classmethod
    def from_samples(cls, samples_ms: list[float]) -> "Latency":
        arr = np.asarray(samples_ms, dtype=np.float64)
        if arr.size == 0:
            return cls(math.nan, math.nan, math.nan, math.nan, 0)
        return cls(p50=float(np.percentile(arr, 50)), p90=float(np.percentile(arr, 90)),
                   mean=float(arr.mean()), std=float(arr.std()), n=int(arr.size))


@dataclass
class CppRun:
    """The export bundle's C++ runner on the device (`--runtime cpp`): its own check against
    PyTorch and its own timings, taken on the device's steady clock (nearest-rank percentiles)."""

    bundle_bytes: int
    load_ms: float | None = None
    first_inference_ms: float | None = None
    latency_ms: Latency | None = None
    max_abs_diff: float | None = None
    rel_err: float | None = None


@dataclass
class Baseline:
    """One baseline engine (`hostkit.engines`) run on the device beside TVM: the same model,
    weights and input, timed with TVM's protocol and checked against PyTorch like TVM.

    `status` is ok, failed (with `reason`; only this engine's cell fails, never the row) or n/a
    (the device lacks the engine). `tvm_ratio` is TVM's p50 over this engine's p50 (0.62: TVM
    takes 0.62 of its time), set only when both matched PyTorch.
    """

    engine: str
    status: str = "failed"
    reason: str | None = None
    version: str | None = None
    threads: int | None = None
    load_s: float | None = None
    first_inference_ms: float | None = None
    latency_ms: Latency | None = None
    max_abs_diff: float | None = None
    rel_err: float | None = None
    tvm_ratio: float | None = None
    emulated: bool = False  # on an emulated board the ratio is qemu's, not the board's

    def cell(self) -> str:
        """What a table shows for it: its p50, or why there is none."""
        if self.status == "ok" and self.latency_ms is not None:
            return f"{self.latency_ms.p50:,.2f}"
        if self.status == "n/a":
            return f"n/a ({self.reason or 'not installed'})"
        return f"failed: {self.reason}"


@dataclass
class RunResult:
    """What a deploy or bench of one model on one device produced; `status` is ok or failed."""

    device: str
    model: str
    target: str | None = None
    requested: str | None = None  # the model as asked for (a name or a path): --rerun-failed
    status: str = "failed"
    error: str | None = None
    stage: str | None = None
    artifact_sha256: str | None = None
    artifact_path: str | None = None
    artifact_bytes: int | None = None
    cached: bool | None = None
    uploaded: bool | None = None
    tuned: bool = False
    records: str | None = None
    tuned_kernels: str | None = None  # kernels the records scheduled / kernels that could be tuned
    emulated: bool = False
    perturbed: bool = False  # a self-test of the check: one weight changed in the deployed copy
    max_abs_diff: float | None = None
    rel_err: float | None = None  # max_abs_diff over ref_max; what `status` is judged on
    ref_max: float | None = None  # the largest |value| in PyTorch's outputs
    cosine: float | None = None
    check: dict[str, Any] = field(default_factory=dict)  # what was compared, by model family
    preprocessing: str | None = None  # the transforms an --input image went through
    precision: str = "fp32"
    quantization: dict[str, Any] | None = None  # int8: calibration, sizes, layers left in fp32
    top1_match: bool | None = None
    top5_match: bool | None = None
    compile_s: float | None = None
    upload_s: float | None = None
    load_s: float | None = None
    first_inference_ms: float | None = None
    memory_mb: float | None = None  # peak resident memory of the device session above its idle
    memory: dict[str, float] = field(default_factory=dict)  # artifact, weights, idle, peak (MB)
    profile: dict[str, Any] | None = None  # per-kernel times on the device (hostkit.run.profile)
    latency_ms: Latency | None = None
    runs_cut: str | None = None  # fewer timed runs than asked, and why (session_timeout)
    cpp: CppRun | None = None  # with --runtime cpp: the same model through the C++ runner
    baselines: list[Baseline] = field(default_factory=list)  # with --baselines, in that order
    fastest: str | None = None  # with --baselines: the engine with the lowest p50 ("tvm", ...)
    device_info: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def ratios(self) -> str:
        """TVM's ratio to each baseline that has one, e.g. `0.62x torch, 1.07x onnxruntime`."""
        mark = "*" if self.emulated else ""
        return ", ".join(f"{b.tvm_ratio:.3g}x {b.engine}{mark}" for b in self.baselines
                         if b.tvm_ratio is not None)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        return {k: _finite(v) for k, v in data.items()}


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
