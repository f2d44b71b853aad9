"""Pre-quantized programs: a `.pt2` the user quantized with PyTorch's PT2E flow, on its own scales.

torchao's `prepare_pt2e`/`convert_pt2e` leave `quantized_decomposed` operators in the program:
`quantize_per_tensor` (round, add the zero point, clamp, cast to uint8 or int8), its
`dequantize_per_tensor` back to float, and int8 weights behind `dequantize_per_channel`. TVM's
importer knows none of them. Here each convolution and linear layer that reads a quantized input
with quantized weights becomes edgekit's integer pattern (`hostkit.models.quantize`): the quantized
input as float integers, the integer weights, one multiply by the product of the scales and one
add. A zero point `zp` is folded in exactly: padding takes the value `zp` (the quantized zero),
and `zp * sum(weights)` per output channel moves into the bias. The build then lowers the pattern
to uint8/int8 x int8 -> int32 kernels (`hostkit.build.int8`), so the board computes with the
user's scales. Every other quantize/dequantize pair stays a float rounding, exactly as PyTorch
computes it; the reference the board is checked against is the user's program as saved.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, cast

from hostkit.errors import ModelError
from hostkit.models.base import LoadedModel

if TYPE_CHECKING:
    import torch

__all__ = ["is_pt2e", "from_pt2e", "register_quantized_ops"]

METHOD = "pt2e (the file's own scales)"


def register_quantized_ops() -> None:
    """Make `torch.export.load` know the `quantized_decomposed` operators a PT2E program holds."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the operators)


def _ops() -> tuple[Any, Any, Any]:
    import torch

    register_quantized_ops()
    ops = torch.ops.quantized_decomposed
    return (ops.quantize_per_tensor.default, ops.dequantize_per_tensor.default,
            ops.dequantize_per_channel.default)


def is_pt2e(program: Any) -> bool:
    quantize, dequantize, per_channel = _ops()
    return any(node.target in (quantize, dequantize, per_channel) for node in program.graph.nodes)


def _quantize(x: "torch.Tensor", inv_scale: float, zero_point: int, qmin: int,
              qmax: int) -> "torch.Tensor":
    """quantize_per_tensor without the cast: the same integers, held as float."""
    import torch

    return torch.clamp(torch.round(x * inv_scale) + zero_point, qmin, qmax)


def _dequantize(q: "torch.Tensor", zero_point: int, scale: float) -> "torch.Tensor":
    return (q - zero_point) * scale


def _qconv(x: "torch.Tensor", weight: "torch.Tensor", scale: "torch.Tensor",
           bias: "torch.Tensor", inv_scale: float, zero_point: int, qmin: int, qmax: int,
           stride: Any, padding: Any, dilation: Any, groups: int) -> "torch.Tensor":
    import torch.nn.functional as F

    q = _quantize(x, inv_scale, zero_point, qmin, qmax)
    if zero_point and any(padding):
        ph, pw = padding
        q = F.pad(q, [pw, pw, ph, ph], value=float(zero_point))
        padding = [0, 0]
    return F.conv2d(q, weight, None, stride, padding, dilation, groups) * scale + bias


def _qlinear(x: "torch.Tensor", weight: "torch.Tensor", scale: "torch.Tensor",
             bias: "torch.Tensor", inv_scale: float, zero_point: int, qmin: int,
             qmax: int) -> "torch.Tensor":
    import torch.nn.functional as F

    return F.linear(_quantize(x, inv_scale, zero_point, qmin, qmax), weight) * scale + bias


def from_pt2e(model: LoadedModel) -> LoadedModel:
    """`model` (a loaded PT2E program) as an int8 model whose layers the build lowers to int8."""
    import torch

    from hostkit.models.quantize import Quantization

    original = model.program.module()
    graph_module = model.program.module()
    layers, left = _rewrite(graph_module)
    if not layers:
        raise ModelError(f"{model.name}: quantized operators found, but no convolution or linear "
                         "layer reads a quantized input with quantized weights", stage="quantize")
    args = tuple(torch.from_numpy(x) for x in model.inputs)
    try:
        program = torch.export.export(graph_module, args)
    except Exception as exc:
        raise ModelError(f"{model.name}: export after rewriting its quantized layers failed: "
                         f"{str(exc).splitlines()[0][:200]}", stage="quantize") from exc
    fp32_mb, int8_mb = _sizes(graph_module)
    info = Quantization(method=METHOD, samples=0, layers=layers, fp32_layers=left,
                        fp32_mb=fp32_mb, int8_mb=int8_mb)
    with torch.no_grad():
        info.vs_source = _agreement(program.module()(*args), original(*args))
    identity = hashlib.sha256(f"{model.identity}|pt2e-int8-1".encode()).hexdigest()
    # The device is checked against PyTorch running the integer form (the same arithmetic, so
    # the usual tolerance holds); the saved program is compared by label, as int8 is.
    return LoadedModel(name=model.name, program=program, inputs=model.inputs, identity=identity,
                       family=model.family, preprocessing=model.preprocessing,
                       precision="int8", quantization=info)


def _agreement(got: Any, want: Any) -> dict[str, Any]:
    """Top-1 and top-3 of the first output (a classifier's logits), and the max abs diff."""
    got = got[0] if isinstance(got, (tuple, list)) else got
    want = want[0] if isinstance(want, (tuple, list)) else want
    result: dict[str, Any] = {"max_abs_diff": float((got - want).abs().max())}
    if got.ndim == 2 and got.shape[-1] >= 3:
        result["top1"] = bool((got.argmax(-1) == want.argmax(-1)).all())
        top3 = [set(t.topk(3).indices.tolist()) for t in (got[0], want[0])]
        result["top3"] = top3[0] == top3[1]
    return result


def _rewrite(gm: "torch.fx.GraphModule") -> tuple[int, list[str]]:
    """Rewrite `gm` in place; the number of integer layers and the names of those left in float."""
    import torch

    quantize, dequantize, per_channel = _ops()
    graph = gm.graph
    layers, left = 0, []
    for node in list(graph.nodes):
        if node.target not in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default):
            continue
        found = _quantized_operands(gm, node, quantize, dequantize, per_channel)
        if found is None:
            left.append(node.name)
            continue
        source, (inv_scale, zero_point, qmin, qmax), weight, scale, bias = found
        conv = node.target == torch.ops.aten.conv2d.default
        shape = (1, -1, 1, 1) if conv else (-1,)
        weight_sum = weight.flatten(1).sum(1).double()
        bias = (bias.double() - zero_point * weight_sum * scale.double()).float()
        names = [_buffer(gm, f"{node.name}_{part}", value) for part, value in
                 (("weight", weight), ("scale", scale.view(shape)), ("bias", bias.view(shape)))]
        with graph.inserting_before(node):
            consts = [graph.get_attr(name) for name in names]
            if conv:
                rest: list[Any] = list(node.args[3:]) + [None] * (4 - len(node.args[3:]))
                stride, padding, dilation, groups = cast(Any, (
                    value if value is not None else default
                    for value, default in zip(rest, ([1, 1], [0, 0], [1, 1], 1))))
                layer: tuple[Any, ...] = (list(stride), list(padding), list(dilation), groups)
                new = graph.call_function(_qconv, (source, *consts, inv_scale, zero_point, qmin,
                                                   qmax, *layer))
            else:
                new = graph.call_function(_qlinear, (source, *consts, inv_scale, zero_point, qmin,
                                                     qmax))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        layers += 1
    graph.eliminate_dead_code()
    _float_rounding(gm, quantize, dequantize, per_channel)
    gm.recompile()
    return layers, left


def _quantized_operands(gm: Any, node: Any, quantize: Any, dequantize: Any,
                        per_channel: Any) -> tuple[Any, tuple[float, int, int, int], Any, Any,
                                                   Any] | None:
    """For a layer `dq(q(x))` x `dq(int weights)`: x, the input's quantization, the integer
    weights (as float), the requantization scale per output channel, the bias."""
    import torch

    data, weight_node = node.args[0], node.args[1]
    bias_node = node.args[2] if len(node.args) > 2 else None
    if getattr(data, "target", None) != dequantize:
        return None
    q = data.args[0]
    if getattr(q, "target", None) != quantize:
        return None
    source, scale, zero_point, qmin, qmax = q.args[:5]
    if not all(isinstance(v, (int, float)) for v in (scale, zero_point, qmin, qmax)):
        return None  # scales computed at run time (dynamic quantization)
    if getattr(weight_node, "target", None) == per_channel:
        ints, scales, zeros = (_constant(gm, a) for a in weight_node.args[:3])
        axis = weight_node.args[3]
        if ints is None or scales is None or axis != 0 or \
                (zeros is not None and bool(torch.any(zeros != 0))):
            return None  # only symmetric weights per output channel
        weight_scale = scales.double()
    elif getattr(weight_node, "target", None) == dequantize:
        ints = _constant(gm, weight_node.args[0])
        w_scale, w_zero = weight_node.args[1:3]
        if ints is None or w_zero != 0 or not isinstance(w_scale, float):
            return None
        weight_scale = torch.full((ints.shape[0],), w_scale, dtype=torch.float64)
    else:
        return None
    bias = _constant(gm, bias_node) if bias_node is not None else torch.zeros(ints.shape[0])
    if bias is None:
        return None
    requant = (weight_scale * float(scale)).float()
    return (source, (1.0 / float(scale), int(zero_point), int(qmin), int(qmax)),
            ints.float(), requant, bias.float())


def _sizes(gm: Any) -> tuple[float, float]:
    """The weights the rewritten program reads, in MB: all in fp32, and with the integer
    weights at one byte each (as the board holds them)."""
    fp32 = int8 = 0
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        value = _constant(gm, node)
        if value is None or not hasattr(value, "numel"):
            continue
        fp32 += value.numel() * 4
        integer = node.target.startswith("_edgekit_") and node.target.endswith("_weight")
        int8 += value.numel() * (1 if integer else 4)
    return round(fp32 / 1e6, 3), round(int8 / 1e6, 3)


def _constant(gm: Any, node: Any) -> "torch.Tensor | None":
    if getattr(node, "op", None) != "get_attr":
        return None
    value = gm
    for part in node.target.split("."):
        value = getattr(value, part)
    return value.detach()


def _buffer(gm: Any, name: str, value: "torch.Tensor") -> str:
    name = f"_edgekit_{name}"
    gm.register_buffer(name, value.contiguous())
    return name


def _float_rounding(gm: Any, quantize: Any, dequantize: Any, per_channel: Any) -> None:
    """The quantize/dequantize pairs left (around additions, pooling, layers kept in float) as
    the float arithmetic PyTorch does; leftover quantized weights dequantized once, here."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.target == quantize:
            x, scale, zero_point, qmin, qmax = node.args[:5]
            with graph.inserting_before(node):
                new = graph.call_function(_quantize, (x, 1.0 / scale, zero_point, qmin, qmax))
        elif node.target == dequantize and getattr(node.args[0], "op", None) != "get_attr":
            q, scale, zero_point = node.args[:3]
            with graph.inserting_before(node):
                new = graph.call_function(_dequantize, (q, zero_point, scale))
        elif node.target in (per_channel, dequantize):
            weight = node.target(*[_constant(gm, a) if getattr(a, "op", None) == "get_attr"
                                   else a for a in node.args])
            name = _buffer(gm, f"{node.name}_float", weight)
            with graph.inserting_before(node):
                new = graph.get_attr(name)
        else:
            continue
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.eliminate_dead_code()
