"""int8: calibrate a model on the host and rewrite it as PyTorch's own quantized model.

Batch norm is folded into the convolutions first (as the build would), then every convolution and
linear layer becomes a quantized one: weights int8 per output channel (symmetric), its input int8
per tensor with a scale from calibration, and the layer computes on the integer values
(`round(x * (1 / s))` clipped to +-127, a convolution with the integer weights, the bias added as an
integer at the accumulator's scale `s * s_w` (as int8 runtimes keep it, in int32), then one
multiply by `s * s_w`: the requantization). The result is an ordinary torch module whose output is
the reference the device must match, and whose exported graph carries exactly the pattern the build
lowers to int8 x int8 -> int32 kernels (`hostkit.build.int8`): the scales PyTorch used are the
scales the board uses.

Calibration runs the folded fp32 model on samples (`--calibration N` seeded tensors, or a folder of
images preprocessed like `--input`) and picks each input's range: `minmax` takes the largest
magnitude seen, `entropy` the clipping threshold whose quantized histogram is closest to the
original in KL divergence (the method of TensorRT and of TVM's own former calibration).
"""

from __future__ import annotations

import copy
import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from hostkit.errors import ModelError
from hostkit.models.base import LoadedModel, make_input
from hostkit.models.inputs import IMAGE_SUFFIXES, read_input

if TYPE_CHECKING:
    import torch

__all__ = ["Quantization", "quantize_int8", "calibration_samples", "METHODS"]

METHODS = ("minmax", "entropy")
QMAX = 127
BINS = 2048  # histogram bins for the entropy method
MAX_CALIBRATION_SAMPLES = 1024


@dataclass
class Quantization:
    """What quantizing did, for the summary and `--json`."""

    method: str
    samples: int
    layers: int  # convolutions and linear layers now int8
    fp32_layers: list[str] = field(default_factory=list)  # weighted layers left in fp32, by name
    fp32_mb: float = 0.0  # the model's weights in fp32
    int8_mb: float = 0.0  # the same after quantizing (int8 weights, fp32 scales and biases)
    vs_fp32_top1: float | None = None  # top-1 agreement with the fp32 model over the samples
    # A PT2E program: its integer arithmetic (in PyTorch) next to the program as saved, which
    # rounds differently (dequantized float convolutions): top-1, top-3 set, max abs diff.
    vs_source: dict[str, Any] | None = None


def calibration_samples(source: str, model: LoadedModel, transforms: Any | None) -> list[np.ndarray]:
    """`source` is a sample count (seeded tensors) or a folder of images/.npy files."""
    if source.isdigit():
        count = int(source)
        if not 1 <= count <= MAX_CALIBRATION_SAMPLES:
            raise ModelError(f"--calibration {source}: give 1 to {MAX_CALIBRATION_SAMPLES} samples "
                             "or a folder of images", stage="quantize")
        shape = model.inputs[0].shape
        return [make_input(tuple(shape), 1000 + i) for i in range(count)]
    folder = Path(source)
    if not folder.is_dir():
        raise ModelError(f"--calibration {source}: not a folder of images nor a sample count",
                         stage="quantize")
    files = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in (*IMAGE_SUFFIXES, ".npy") and p.is_file())
    if not files:
        raise ModelError(f"--calibration {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) or "
                         ".npy files in it", stage="quantize")
    samples = [read_input(p, model.name, transforms) for p in files[:MAX_CALIBRATION_SAMPLES]]
    want = model.inputs[0].shape
    for path, sample in zip(files, samples):
        if sample.shape != want:
            raise ModelError(f"calibration file {path} gives shape {tuple(sample.shape)}; the model "
                             f"takes {tuple(want)} (give --input-shape or same-sized images)",
                             stage="quantize")
    return samples


def quantize_int8(model: LoadedModel, samples: list[np.ndarray], method: str) -> tuple[
        LoadedModel, Quantization]:
    """The quantized model (its reference is PyTorch's quantized output) and what was done."""
    from torch import nn

    if method not in METHODS:
        raise ModelError(f"--calibration-method {method}: choose {' or '.join(METHODS)}",
                         stage="quantize")
    if model._module is None:
        raise ModelError(f"{model.name}: --quantize needs a model by name; a .pt2 quantized in "
                         "PyTorch is not supported yet", stage="quantize")
    folded = _fold_batch_norms(copy.deepcopy(model._module)).eval()
    layers = [(n, m) for n, m in folded.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not layers:
        raise ModelError(f"{model.name} has no convolution or linear layer to quantize",
                         stage="quantize")
    observed = _observe(folded, [name for name, _ in layers], samples)
    scales = {name: _threshold(values, method) / QMAX for name, values in observed.items()}
    quantized = copy.deepcopy(folded)
    left: list[str] = []
    for name, layer in layers:
        if name not in scales or scales[name] <= 0:
            left.append(name)  # never reached by the forward pass, or saw only zeros
            continue
        conv_class, linear_class = _quant_classes()
        layer_class = conv_class if isinstance(layer, nn.Conv2d) else linear_class
        _replace(quantized, name, layer_class(layer, scales[name]))
    quantized.eval()
    info = Quantization(method=method, samples=len(samples), layers=len(layers) - len(left),
                        fp32_layers=left, fp32_mb=_megabytes(model._module, False),
                        int8_mb=_megabytes(quantized, True))
    info.vs_fp32_top1 = _top1_agreement(model._module, quantized, [*samples, *model.inputs])
    digest = hashlib.sha256(model.identity.encode())
    digest.update(f"int8|{method}|{len(samples)}|int32-bias|inverse-scale".encode())
    for name in sorted(scales):
        digest.update(f"{name}={scales[name]!r}".encode())
    return LoadedModel(name=model.name, program=None, inputs=model.inputs,
                       identity=digest.hexdigest(), _module=quantized, family=model.family,
                       preprocessing=model.preprocessing, precision="int8",
                       quantization=info), info


def _fold_batch_norms(module: "torch.nn.Module") -> "torch.nn.Module":
    """Fold each batch norm that directly follows a convolution in a container into it."""
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    module.eval()
    for parent in list(module.modules()):
        names = list(parent._modules)
        for first, second in zip(names, names[1:]):
            conv, norm = parent._modules[first], parent._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                parent._modules[first] = fuse_conv_bn_eval(conv, norm)
                parent._modules[second] = nn.Identity()
    return module


def _observe(module: "torch.nn.Module", names: list[str],
             samples: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Every quantized layer's input magnitudes over the samples (absolute values, flattened)."""
    import torch

    seen: dict[str, list[np.ndarray]] = {}
    wanted = set(names)
    hooks = []
    for name, layer in module.named_modules():
        if name in wanted:
            def record(_layer: Any, inputs: Any, name: str = name) -> None:
                seen.setdefault(name, []).append(inputs[0].detach().abs().flatten().numpy())
            hooks.append(layer.register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            for sample in samples:
                module(torch.from_numpy(sample))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: np.concatenate(parts) for name, parts in seen.items()}


def _threshold(values: np.ndarray, method: str) -> float:
    peak = float(values.max()) if values.size else 0.0
    if method == "minmax" or peak == 0.0:
        return peak
    return _kl_threshold(values, peak)


def _kl_threshold(values: np.ndarray, peak: float) -> float:
    """The clipping threshold minimising KL(P || Q) between the clipped histogram P and its
    int8-quantized version Q (128 levels for the magnitude)."""
    hist, edges = np.histogram(values, bins=BINS, range=(0.0, peak))
    hist = hist.astype(np.float64)
    levels = QMAX + 1
    best, best_kl = peak, np.inf
    for stop in range(levels, BINS + 1, 16):
        reference = hist[:stop].copy()
        reference[stop - 1] += hist[stop:].sum()  # outliers clip into the last bin
        if reference.sum() == 0:
            continue
        chunks = np.array_split(np.arange(stop), levels)
        expanded = np.zeros(stop)
        for chunk in chunks:
            part = hist[chunk]
            nonzero = part > 0
            if nonzero.any():
                expanded[chunk[nonzero]] = part.sum() / nonzero.sum()
        p = reference / reference.sum()
        q = expanded / expanded.sum() if expanded.sum() else expanded
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best_kl:
            best, best_kl = float(edges[stop]), kl
    return best


def _int8_weights(weight: "torch.Tensor", input_scale: float) -> tuple["torch.Tensor",
                                                                      "torch.Tensor"]:
    """Per-output-channel int8 weights (held as float, integral) and the requantization scale."""
    import torch

    w = weight.detach().double()
    per_channel = w.abs().flatten(1).amax(dim=1).clamp(min=1e-12) / QMAX
    shape = (-1,) + (1,) * (w.ndim - 1)
    integers = torch.round(w / per_channel.view(shape)).clamp(-QMAX, QMAX)
    return integers.float(), (per_channel * input_scale).float()


@functools.lru_cache(maxsize=1)
def _quant_classes() -> tuple[type, type]:
    """The quantized layers, defined once torch is imported (edgekit imports torch lazily)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class QuantLayer(nn.Module):
        """int8 weights per output channel, the fused requantization scale, and the bias as
        integers at that scale: `(acc + bias) * scale`. The add comes before the multiply, so
        no multiply feeds an add and a device's FMA rounds nothing PyTorch rounds twice."""

        weight_int: torch.Tensor
        scale: torch.Tensor
        bias: torch.Tensor

        def __init__(self, layer: nn.Conv2d | nn.Linear, input_scale: float,
                     shape: tuple[int, ...]) -> None:
            super().__init__()
            integers, scale = _int8_weights(layer.weight, input_scale)
            bias = layer.bias.detach() if layer.bias is not None else torch.zeros(len(scale))
            self.register_buffer("weight_int", integers)
            self.register_buffer("scale", scale.view(shape))
            bias_int = torch.round(bias.double() / scale.double()).clamp(-2**31, 2**31 - 1)
            self.register_buffer("bias", bias_int.float().view(shape))
            self.input_scale = input_scale
            # Quantizing multiplies by the scale's inverse (a float32 value, so PyTorch and the
            # device multiply by the same number): a divide costs a vector unit ten times what a
            # multiply does, once for every activation of the model (MobileNetV2 int8: 6.16 -> 5.98 ms)
            self.input_inverse = float(np.float32(1.0 / input_scale))

        def quantize(self, x: torch.Tensor) -> torch.Tensor:
            return torch.clamp(torch.round(x * self.input_inverse), -QMAX, QMAX)

    class QuantConv(QuantLayer):
        def __init__(self, conv: nn.Conv2d, input_scale: float) -> None:
            super().__init__(conv, input_scale, (1, -1, 1, 1))
            self.stride, self.padding = conv.stride, cast(Any, conv.padding)
            self.dilation, self.groups = conv.dilation, conv.groups

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.conv2d(self.quantize(x), self.weight_int, None, self.stride, self.padding,
                         self.dilation, self.groups)
            return (y + self.bias) * self.scale

    class QuantLinear(QuantLayer):
        def __init__(self, linear: nn.Linear, input_scale: float) -> None:
            super().__init__(linear, input_scale, (-1,))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (F.linear(self.quantize(x), self.weight_int) + self.bias) * self.scale

    return QuantConv, QuantLinear


def _replace(root: "torch.nn.Module", dotted: str, new: "torch.nn.Module") -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    parent._modules[child] = new


def _megabytes(module: "torch.nn.Module", quantized: bool) -> float:
    total = 0
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if name.endswith("num_batches_tracked"):
            continue
        int8 = quantized and name.endswith("weight_int")
        total += tensor.numel() * (1 if int8 else tensor.element_size())
    return round(total / 1e6, 3)


def _top1_agreement(fp32: "torch.nn.Module", int8: "torch.nn.Module",
                    samples: list[np.ndarray]) -> float | None:
    import torch

    agree = total = 0
    with torch.no_grad():
        for sample in samples:
            x = torch.from_numpy(sample)
            a, b = fp32(x), int8(x)
            if not isinstance(a, torch.Tensor) or a.ndim != 2:
                return None  # not a classifier's logits
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += a.shape[0]
    return round(agree / total, 4) if total else None
