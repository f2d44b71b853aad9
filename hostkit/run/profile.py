"""Where the time goes: the device's per-kernel times turned into rows a user recognises.

The daemon times every call the Relax VM makes (`edgekit.profile_instrument`); here each TIR
kernel's symbol and argument shapes become a name like `conv2d 3x3 64->64 @56x56 (+ add, relu)`,
with its calls and time per inference, share of the kernels' total, and GFLOP/s where the FLOPs
follow from the shapes (convolutions in NCHW, matmuls). VM built-ins (allocation, shape checks) are
one row. The kernels' sum is set against the end-to-end latency measured without the instrument,
so the table says how much it does not account for.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from typing import Any

__all__ = ["KernelRow", "Profile", "kernel_rows"]


@dataclass(frozen=True)
class KernelRow:
    name: str
    symbol: str
    calls: float  # per inference
    total_ms: float  # per inference
    mean_ms: float  # per call
    share: float  # of the kernels' total
    gflops: float | None
    tuned: bool


@dataclass(frozen=True)
class Profile:
    rows: list[KernelRow]
    kernels_ms: float  # the rows' total per inference
    end_to_end_ms: float | None  # p50 without the instrument
    runs: int

    @property
    def unaccounted(self) -> float | None:
        """The share of the end-to-end latency the kernels do not explain (negative: overhead of
        timing each call)."""
        if not self.end_to_end_ms:
            return None
        return 1.0 - self.kernels_ms / self.end_to_end_ms

    def to_json(self) -> dict[str, Any]:
        return {"kernels_ms": self.kernels_ms, "end_to_end_ms": self.end_to_end_ms,
                "unaccounted": self.unaccounted, "runs": self.runs,
                "rows": [row.__dict__ for row in self.rows]}


def kernel_rows(raw: dict[str, Any], runs: int, tuned: bool,
                end_to_end_ms: float | None) -> Profile:
    builtin_ms = builtin_calls = 0.0
    rows = []
    for symbol, entry in raw.items():
        calls = entry["calls"] / runs
        per_run_ms = _typical_ms(entry) * calls
        if symbol.startswith("vm.builtin") or "." in symbol:
            builtin_ms += per_run_ms
            builtin_calls += calls
            continue
        rows.append((symbol, calls, per_run_ms, entry["shapes"]))
    total = sum(r[2] for r in rows) + builtin_ms
    out = [KernelRow(name=_pretty(symbol, shapes, tuned), symbol=symbol, calls=calls,
                     total_ms=ms, mean_ms=ms / calls if calls else 0.0,
                     share=ms / total if total else 0.0,
                     gflops=_gflops(symbol, shapes, ms / calls if calls else 0.0, tuned),
                     tuned=tuned)
           for symbol, calls, ms, shapes in rows]
    if builtin_calls:
        out.append(KernelRow("VM built-ins (allocation, shape checks)", "vm.builtin.*",
                             builtin_calls, builtin_ms, builtin_ms / builtin_calls,
                             builtin_ms / total if total else 0.0, None, False))
    out.sort(key=lambda r: -r.total_ms)
    return Profile(out, total, end_to_end_ms, runs)


def _ops(symbol: str) -> list[str]:
    # TVM numbers kernels of one op kind (conv2d, conv2d1, ...) and fused ones by their parts.
    parts = [re.sub(r"\d+$", "", part) for part in symbol.removeprefix("fused_").split("_")]
    known = ("direct_conv", "depthwise_conv", "winograd_pack", "winograd_gemm", "winograd_unpack",
             "gemv", "expansion", "conv2d", "matmul", "add", "relu", "multiply", "max_pool2d",
             "adaptive_avg_pool2d", "mean", "clip", "subtract", "divide", "reshape", "transpose",
             "concatenate", "round", "astype", "maximum", "minimum", "sigmoid", "softmax",
             "layer_norm")
    ops, i = [], 0
    while i < len(parts):
        for width in (3, 2, 1):
            word = "_".join(parts[i:i + width])
            if word in known:
                ops.append("conv2d" if word == "direct_conv" else word)  # edgekit's own kernel
                i += width
                break
        else:
            i += 1
    return ops or [symbol]


def _conv(shapes: list[list[int]],
          tuned: bool) -> tuple[int, int, int, int, int, int, int] | None:
    """(kh, kw, in channels, out channels, out height, out width, inputs per output) of a
    convolution kernel from its buffers, in NCHW/OIHW, or NHWC with OHWI weights (tuned builds)
    or HWIO weights (untuned builds, `hostkit.build.cpu_schedule`); None when the weights were
    rewritten into a blocked layout (tuned kernels) and the layout cannot be told. edgekit's
    direct kernel (`hostkit.build.direct`) reads NHWC data and [out/b, kh, kw, in, b] weights."""
    if len(shapes) < 3 or len(shapes[0]) != 4 or len(shapes[-1]) != 4:
        return None
    data, w, out = shapes[0], shapes[1], shapes[-1]
    # the direct kernel's input and packed weights, wherever a fused prologue (a residual
    # branch's batch norm) put them among the kernel's arguments
    packed = next((i for i in range(1, len(shapes) - 1) if len(shapes[i]) == 5), None)
    if packed is not None:
        data, w = shapes[packed - 1], shapes[packed]
    if len(w) == 5 and w[0] * w[4] == out[3] and w[3] in (data[3], data[1]):  # the direct
        return w[1], w[2], w[3], out[3], out[1], out[2], w[3]  # kernel (NCHW data: a first layer)
    if len(w) != 4:
        return None
    if w[0] == out[1] and w[1] and data[1] % w[1] == 0:  # NCHW data, OIHW weights
        return w[2], w[3], data[1], w[0], out[2], out[3], w[1]
    if tuned and w[0] == out[3] and w[3] and data[3] % w[3] == 0:  # NHWC data, OHWI weights
        return w[1], w[2], data[3], w[0], out[1], out[2], w[3]
    if not tuned and w[3] == out[3] and w[2] and data[3] % w[2] == 0:  # NHWC, HWIO weights
        return w[0], w[1], data[3], w[3], out[1], out[2], w[2]
    return None


def _depthwise(shapes: list[list[int]]) -> tuple[int, int, int, int, int] | None:
    """(kh, kw, channels, out height, out width) of `hostkit.build.depthwise`'s kernel: NHWC
    data, [kh, kw, c] weights."""
    if len(shapes) < 3 or len(shapes[1]) != 3 or len(shapes[-1]) != 4:
        return None
    (kh, kw, c), out = shapes[1], shapes[-1]
    return kh, kw, c, out[1], out[2]


def _expansion(shapes: list[list[int]]) -> tuple[int, int, int, int, int, int] | None:
    """(in, out channels, height, width, out height, out width) of `hostkit.build.expansion`'s
    kernel: NHWC data, [in, out] weights, a bias, [3, 3, out] depthwise weights."""
    if len(shapes) < 5 or len(shapes[0]) != 4 or len(shapes[1]) != 2 or len(shapes[-1]) != 4:
        return None
    (_, h, w, cin), (_, cout), out = shapes[0], shapes[1], shapes[-1]
    return cin, cout, h, w, out[1], out[2]


# `hostkit.build.direct_winograd`'s three kernels
_WINOGRAD = {"winograd_pack": "input transform", "winograd_gemm": "multiply",
             "winograd_unpack": "output transform"}


def _typical_ms(entry: dict[str, Any]) -> float:
    """A call's time: the median of its calls where the daemon sent each, so that one call slowed
    by something else on the device (another process, a page fault) does not move the row."""
    each = entry.get("each")
    if not each:
        return float(entry["seconds"]) * 1e3 / entry["calls"] if entry["calls"] else 0.0
    return float(statistics.median(each)) * 1e3


def _pretty(symbol: str, shapes: list[list[int]], tuned: bool) -> str:
    ops = _ops(symbol)
    if "conv2d" in ops:  # a kernel named by what leads it (batch norm fused before a 1x1)
        ops.remove("conv2d")
        ops.insert(0, "conv2d")
    head, rest = ops[0], ops[1:]
    tail = f" (+ {', '.join(dict.fromkeys(rest))})" if rest else ""
    conv = _conv(shapes, tuned) if head == "conv2d" else None
    if conv is not None:
        kh, kw, cin, cout, oh, ow, _ = conv
        return f"conv2d {kh}x{kw} {cin}->{cout} @{oh}x{ow}{tail}"
    if head == "depthwise_conv" and _depthwise(shapes):
        kh, kw, c, oh, ow = _depthwise(shapes)  # type: ignore[misc]
        return f"depthwise {kh}x{kw} {c} channels @{oh}x{ow}{tail}"
    if head in _WINOGRAD and len(shapes) >= 2:
        channels, outputs = shapes[0][-1], shapes[-1][-1]
        label = {"winograd_pack": f"{channels} channels", "winograd_unpack": f"{outputs} channels",
                 "winograd_gemm": f"{channels}->{outputs}"}[head]
        return f"winograd 3x3 {_WINOGRAD[head]} {label}{tail}"
    if head == "matmul" and len(shapes) >= 2:
        return f"matmul {'x'.join(map(str, shapes[0]))} by {'x'.join(map(str, shapes[1]))}{tail}"
    if head == "expansion" and _expansion(shapes):
        cin, cout, h, w, oh, ow = _expansion(shapes)  # type: ignore[misc]
        return (f"conv2d 1x1 {cin}->{cout} @{h}x{w} + depthwise 3x3 {cout} channels "
                f"@{oh}x{ow}{tail}")
    if head == "gemv" and len(shapes) >= 2 and len(shapes[1]) == 2:  # weights [out, in]
        return f"matmul {'x'.join(map(str, shapes[0]))} by {shapes[1][1]}x{shapes[1][0]}{tail}"
    return f"{head}{tail}"


def _gflops(symbol: str, shapes: list[list[int]], mean_ms: float,
            tuned: bool) -> float | None:
    ops = _ops(symbol)
    if not mean_ms or not shapes:
        return None
    flops = None
    conv = _conv(shapes, tuned) if "conv2d" in ops else None
    if conv is not None:
        kh, kw, _, cout, oh, ow, per_output = conv
        flops = 2 * shapes[-1][0] * cout * oh * ow * per_output * kh * kw
    elif ops[0] == "depthwise_conv" and _depthwise(shapes):
        kh, kw, c, oh, ow = _depthwise(shapes)  # type: ignore[misc]
        flops = 2 * shapes[-1][0] * oh * ow * c * kh * kw
    elif ops[0] == "winograd_gemm" and len(shapes) == 3 and len(shapes[0]) == 3:
        flops = 2 * math.prod(shapes[0]) * shapes[-1][-1]  # the multiplies it does, 2.25x fewer
    elif ops[0] == "matmul" and len(shapes) >= 2 and len(shapes[0]) >= 2 and len(shapes[1]) == 2:
        a, b = shapes[0], shapes[1]
        flops = 2 * math.prod(a) * b[-1]
    elif ops[0] == "expansion" and _expansion(shapes):
        cin, cout, h, w, oh, ow = _expansion(shapes)  # type: ignore[misc]
        flops = 2 * shapes[-1][0] * (h * w * cin * cout + oh * ow * cout * 9)
    elif ops[0] == "gemv" and len(shapes) >= 2:
        flops = 2 * math.prod(shapes[1])  # `hostkit.build.gemv`: one row by weights [out, in]
    return round(flops / (mean_ms * 1e-3) / 1e9, 1) if flops else None
