"""Untuned CPU builds: convolutions in NHWC, and a default schedule for every kernel.

Without tuning records TVM compiles each kernel as the loop nest Relax legalized it into (one
thread, no vectors): an untuned ResNet-18 was about 40 times slower than PyTorch. Here an
untuned LLVM build (`compile_untuned`) runs its convolutions in NHWC with HWIO weights (folded
at build time), so every weight row a convolution reads is contiguous, and gives each kernel
nobody scheduled (`default_schedule`, after fusion) the schedule a person would write first:

- elementwise blocks inlined into their elementwise neighbours, never into a reduction (a
  padding block there is recomputed for every use, its bounds check in the innermost loop);
- each remaining block's spatial loops outermost, fused and parallel over the cores;
- its innermost spatial loop split to the target's vector width and vectorized;
- a reduction (a convolution, a matmul) accumulating in registers: rows of pixels (4, 7, 2 or
  3, whichever divides the map) by two vectors of output channels, so each weight vector
  loaded serves every row, written back once per block of output; in a late layer (fewer
  pixels than terms per output) the output channels are the outermost parallel axis, so a
  slice of weights stays in cache while every pixel uses it.

Measured on the 2-core build machine (untuned, in-process): ResNet-18 fp32 2.5-3.2 s -> 54 ms,
MobileNetV2 fp32 348 -> 10.6 ms, int8 31 -> 6.2 ms, outputs unchanged against PyTorch. A
kernel the rule cannot schedule stays as it was; scheduling changes what a kernel computes only
by float rounding (an inlined multiply and add become one FMA), which an int8 build, checked
exactly, avoids (`compile_untuned(exact=True)`). edgekit's VNNI kernels are marked scheduled
and left alone; a tuned build applies its records instead of this.

Most float convolutions never reach that rule: they run on edgekit's own kernels, which
`direct_schedule` schedules in untuned and tuned builds alike (the direct kernel with weights
packed at build time, Winograd's, the depthwise one, MobileNet's widest expansion fused with
its depthwise convolution), as does a classifier's matrix-vector product (`hostkit.build.gemv`).
With them and the device's threads on every core, untuned ResNet-18 takes 11 ms and
MobileNetV2 3 (in-process, 2 threads; bench/README.md has the history).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from hostkit.build.targets import vector_bits as _vector_bits
from hostkit.build.targets import wide_vectors
from hostkit.errors import first_line

if TYPE_CHECKING:
    import tvm

__all__ = ["compile_untuned", "nhwc_convolutions", "default_schedule", "build_pipeline",
           "vnni_schedule", "direct_schedule"]

log = logging.getLogger("edgekit")
# Rows of an output axis accumulated beside each vector, in order of preference: four keep an
# FMA unit busy; 7 and 2 fit the 14x14 and 7x7 maps whose rows four does not divide.
UNROLL = (4, 7, 2, 3)
# An elementwise kernel's parallel loop keeps at least this many iterations (the cores take
# them in chunks) and leaves the loops inside it plain.
PARALLEL_ITERATIONS = 64


def nhwc_convolutions(mod: "tvm.IRModule", target: "tvm.target.Target") -> "tvm.IRModule":
    """`mod` with its 2-D convolutions in NHWC and their (constant) weights folded to HWIO; `mod`
    as it is where TVM's layout conversion cannot convert it (it stops on some operators of the
    detectors' post-processing, e.g. a one-piece split: "InferLayoutSplit: Invalid Call")."""
    import tvm
    from tvm.relax import transform as rt

    from hostkit.build.rewrite import clips_as_min_max

    try:
        with target:
            converted: tvm.IRModule = tvm.transform.Sequential([
                rt.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]}),
                rt.FoldConstant(),
            ])(clips_as_min_max(mod))
    except Exception as exc:  # TVM raises its own errors from inside the pass
        log.info("convolutions stay NCHW: TVM's layout conversion stopped (%s)",
                 first_line(exc)[:200])
        return mod  # as it came: the detectors' post-processing is then left untouched
    return converted


def build_pipeline(target: "tvm.target.Target", exact: bool = False) -> "tvm.transform.Pass":
    """TVM's CPU pipeline with the default schedule applied to every unscheduled kernel, after
    fusion and before the module is lowered."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.s_tir import dlight

    @tvm.transform.module_pass(opt_level=0, name="EdgekitCPUPipeline")
    def pipeline(mod: "tvm.IRModule", _ctx: Any) -> "tvm.IRModule":
        with target:
            passes = (cpu.library_dispatch_passes(target) + cpu.legalize_passes(target)
                      + [dlight.ApplyDefaultSchedule(default_schedule(exact))]
                      + cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target))
            result: tvm.IRModule = tvm.transform.Sequential(passes)(mod)
        return result

    return pipeline


def compile_untuned(mod: "tvm.IRModule", target: "tvm.target.Target",
                    exact: bool = False) -> Any:
    """The executable of an untuned build: for an LLVM target in NHWC with default schedules,
    for any other target as TVM compiles it.

    A module whose NHWC form does not build is built as it came. `exact` (an int8 model) keeps
    float multiplies out of their consumers' expressions: once a multiply and an add share one,
    LLVM fuses them into an FMA, one rounding where PyTorch's quantized model has two, and a
    value a hair from .5 then quantizes the other way (measured: MobileNetV2 int8 0.19 off
    PyTorch's quantized model with them inlined, exact without)."""
    import tvm

    if str(target.kind.name) != "llvm":
        return tvm.compile(mod, target)
    target = wide_vectors(target)
    pipeline = build_pipeline(target, exact)
    converted = nhwc_convolutions(mod, target)
    if converted is not mod:
        from tvm.relax import transform as rt

        from hostkit.build.direct import direct_convolutions
        from hostkit.build.expansion import fused_expansions
        from hostkit.build.gemv import matrix_vector_products
        from hostkit.build.rewrite import divides_as_multiplies

        # Batch norm as the multiply and add it is at inference, which fuse into the direct
        # kernel's epilogue (its (normalized, mean, var)[0] canonicalized, or fusion stops at the
        # tuple: each ReLU6 a pass of its own). Folded into the weights before the layout
        # conversion, as a tuned build does, it crashed that on RetinaNet and FCOS (a segfault).
        converted = tvm.transform.Sequential([
            rt.DecomposeOpsForInference(), rt.CanonicalizeBindings(), rt.FoldConstant()])(
                converted)
        converted = matrix_vector_products(direct_convolutions(
            fused_expansions(converted, target), target), target)
        if not exact:
            converted = divides_as_multiplies(converted)
        try:
            return tvm.compile(converted, target, relax_pipeline=pipeline)
        except Exception as exc:  # a layout TVM converted but cannot lower
            log.info("the NHWC module did not build (%s); building it NCHW",
                     first_line(exc)[:200])
    return tvm.compile(mod, target, relax_pipeline=pipeline)


def default_schedule(exact: bool = False) -> Any:
    """The dlight rule applying the schedule this module describes to one kernel, or leaving
    it as it was (None) when a step does not fit it (opaque blocks, dynamic loops)."""
    from tvm import tirx
    from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

    class DefaultCPUSchedule(CPUScheduleRule):
        def apply(self, func: Any, target: "tvm.target.Target", _tunable: bool) -> Any:
            if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
                return None
            try:
                return (vnni_schedule(func, _vector_bits(target))
                        or direct_schedule(func, target)
                        or _schedule(func, _vector_bits(target), exact))
            except Exception:  # scheduling failed part way: the kernel stays as it was
                return None

    return DefaultCPUSchedule()


def vnni_schedule(func: Any, vector_bits: int) -> Any:
    """The schedule of a kernel holding `vnni.matmul_kernel`'s block, or None when it has none:
    pixels split across cores (a few pixels of a row per weight load), each 16 output channels
    one `vpdpbusd` per 4 input channels, and the elementwise epilogue computed on each block of
    output while it is in registers. An epilogue part that must stay apart (a float multiply
    feeding an add: an FMA would round once where PyTorch rounds twice) runs as its own loop."""
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    from hostkit.build.vnni import BLOCK, DEPTH, INTRIN, LANES, register_intrinsic

    sch = s_tir.Schedule(func)
    try:
        block = sch.get_sblock(BLOCK)
    except Exception:  # not a VNNI kernel
        return None
    register_intrinsic()
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    mine = next(info for info in infos if sch.get(info.block_rv).same_as(sch.get(block)))
    rest = [info for info in _inline(sch, infos, exact=True) if info is not mine]
    # Normalizing dropped the loops of extent 1 (a batch of 1, a 1x1 convolution's one tap, a
    # linear layer's one row): the loops left are the pixels', the channels', then the taps'
    # (when more than one) and the depth's.
    loops = sch.get_loops(block)
    spatial = [loop for loop, kind in zip(loops, mine.dom_kind()) if kind == "S"]
    reduce = [loop for loop, kind in zip(loops, mine.dom_kind()) if kind == "R"]
    *pixels, n = spatial
    *taps, d = reduce
    tile = []
    if pixels:
        extent = int(sch.get(pixels[-1]).extent.value)
        # a pixel tile that divides the row: a predicate on the block would defeat tensorize
        pixels[-1], pi = sch.split(pixels[-1], [None, max(f for f in range(1, 9)
                                                          if extent % f == 0)])
        tile = [pi]
    no, ni = sch.split(n, [None, LANES])
    do, di = sch.split(d, [None, DEPTH])
    sch.reorder(*pixels, no, *taps, do, *tile, ni, di)
    outer = sch.fuse(*pixels, no) if pixels else no
    sch.parallel(outer)
    consumers = sch.get_consumers(block)
    if len(consumers) == 1:
        stmt = sch.get(consumers[0])
        epilogue = next((info for info in rest if sch.get(info.block_rv).same_as(stmt)), None)
        if epilogue is not None and epilogue.is_injective():
            sch.reverse_compute_at(consumers[0], outer)
            sch.vectorize(sch.get_loops(consumers[0])[-1])
            rest.remove(epilogue)
    init = sch.decompose_reduction(block, taps[0] if taps else do)
    sch.tensorize(ni, INTRIN)
    sch.vectorize(sch.get_loops(init)[-1])
    for loop in tile:
        sch.unroll(loop)
    while rest:
        _schedule_block(sch, rest.pop(0), vector_bits, rest)
    return sch


def direct_schedule(func: Any, target: "tvm.target.Target") -> Any:
    """The schedule of a kernel holding `direct.conv_kernel`'s block, or None when it has none:
    blocks of output (up to 14 pixels of a row by one or two vectors of output channels, as
    many as the registers hold beside a weight vector and a broadcast) accumulated in
    registers, the input channels and the window outside them; the cores share the blocks
    by output channels or by pixels, whichever reads less (`_channels_outermost`); the
    epilogue computed on each block as it is written back; the padding its own parallel loop."""
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    from hostkit.build.depthwise import depthwise_schedule
    from hostkit.build.direct import BLOCK
    from hostkit.build.direct_winograd import GEMM, find_block, winograd_schedule
    from hostkit.build.expansion import expansion_schedule
    from hostkit.build.gemv import gemv_schedule
    from hostkit.build.targets import registers

    sch = s_tir.Schedule(func)
    if (block := find_block(sch, (BLOCK, GEMM))) is None:
        return (winograd_schedule(func, target) or depthwise_schedule(func, target)
                or gemv_schedule(func, target) or expansion_schedule(func, target))
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    mine = next(info for info in infos if sch.get(info.block_rv).same_as(sch.get(block)))
    rest = [info for info in _inline(sch, infos) if info is not mine]
    loops = sch.get_loops(block)
    spatial = [loop for loop, kind in zip(loops, mine.dom_kind()) if kind == "S"]
    reduce = [loop for loop, kind in zip(loops, mine.dom_kind()) if kind == "R"]
    weights = next(region.source for region in sch.get(block).reads
                   if len(region.source.shape) == 5)  # [out / block, kh, kw, in, block]
    width = int(weights.shape[-1])
    lanes = max(_vector_bits(target) // 32, 4)
    lanes = lanes if width % lanes == 0 else lanes // 2  # `direct.output_block`'s half vectors
    vectors = width // lanes
    *pixels, channels = spatial
    if not pixels or not reduce or _extent(sch, channels) is None:
        return None
    row = _extent(sch, pixels[-1]) or 1
    most = min(14, (registers(target) - 4) // vectors)
    rows = max(r for r in range(1, most + 1) if row % r == 0)
    pixels[-1], tile = sch.split(pixels[-1], [None, rows])
    outer_channels, inner = sch.split(channels, [None, width])
    vector_loops = [inner]
    if vectors > 1:
        vector_loops = list(sch.split(inner, [None, lanes]))
    order = [outer_channels, *pixels] if _channels_outermost(sch, block, weights) else [
        *pixels, outer_channels]
    sch.reorder(*order, *reduce, tile, *vector_loops)
    outer = sch.fuse(*order)
    sch.parallel(outer)
    sch.unroll(tile)
    if vectors > 1:
        sch.unroll(vector_loops[0])
    sch.vectorize(vector_loops[-1])
    accumulator = sch.cache_write(block, 0, "global")
    sch.reverse_compute_at(accumulator, outer)
    _fuse_epilogue(sch, accumulator, rest)
    sch.vectorize(sch.get_loops(accumulator)[-1])
    init = sch.decompose_reduction(block, reduce[0])
    sch.vectorize(sch.get_loops(init)[-1])
    vector_bits = _vector_bits(target)
    while rest:
        _schedule_block(sch, rest.pop(0), vector_bits, rest)
    return sch


def _channels_outermost(sch: Any, block: Any, weights: Any) -> bool:
    """Whether the cores share a convolution's blocks by output channels (each reads its slice
    of the weights once, the input once per slice) rather than by pixels (each reads its
    pixels' input once, the weights once per block of pixels): by channels where the weights
    outweigh the input (ResNet-18's 9 MB layers for 100 KB of input: by pixels 2.3x slower),
    else by pixels (MobileNetV2's 16 -> 96 expansion at 112x112 0.47 -> 0.26 ms: by channels it
    wrote a third of each pixel per pass over its 4.8 MB output). Winograd's multiply (`GEMM`)
    goes by pixels: its tiles' inputs then stay in cache."""
    from hostkit.build.direct import BLOCK

    if sch.get(block).name_hint != BLOCK:
        return False
    inputs = [math.prod(int(d) for d in region.source.shape) for region in sch.get(block).reads
              if not region.source.same_as(weights)]
    return math.prod(int(d) for d in weights.shape) > max(inputs, default=0)


def _extent(sch: Any, loop: Any) -> int | None:
    extent = sch.get(loop).extent
    return int(extent.value) if hasattr(extent, "value") else None


def _schedule(func: Any, vector_bits: int, exact: bool = False) -> Any:
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    sch = s_tir.Schedule(func)
    blocks = normalize_prim_func(sch)
    if blocks is None:
        return None
    blocks = _inline(sch, blocks, exact)
    scheduled = False
    while blocks:
        info = blocks.pop(0)
        scheduled = _schedule_block(sch, info, vector_bits, blocks) or scheduled
    return sch if scheduled else None


def _inline(sch: Any, blocks: list[Any], exact: bool = False) -> list[Any]:
    """Inline elementwise blocks into elementwise consumers (or, failing that, elementwise
    producers); returns the blocks left. With `exact`, a float multiply is never inlined where
    it would feed an add: in one expression LLVM fuses the two into an FMA."""
    def pick(rvs: list[Any]) -> list[Any]:
        stmts = [sch.get(rv) for rv in rvs]
        return [info for info in blocks
                if any(sch.get(info.block_rv).same_as(stmt) for stmt in stmts)]

    def reduction(infos: list[Any]) -> bool:
        """A reduction, or a gather (edgekit's im2col) that would recompute what is inlined
        into it once for every window an input value falls in."""
        return any(not info.is_injective() or gather(info) for info in infos)

    def gather(info: Any) -> bool:
        from hostkit.build.vnni import IM2COL

        return str(sch.get(info.block_rv).name_hint) == IM2COL

    def fma(producers: list[Any], consumers: list[Any]) -> bool:
        return exact and any(_fma_risk(sch.get(p.block_rv), sch.get(c.block_rv))
                             for p in producers for c in consumers)

    changed = True
    while changed:
        changed = False
        for index, info in enumerate(blocks):
            if not info.is_injective() or gather(info):
                continue
            try:
                consumers = pick(sch.get_consumers(info.block_rv))
                if consumers and not reduction(consumers) and not fma([info], consumers):
                    sch.compute_inline(info.block_rv)
                else:
                    producers = pick(sch.get_producers(info.block_rv))
                    if not producers or reduction(producers) or fma(producers, [info]):
                        continue
                    sch.reverse_compute_inline(info.block_rv)
            except Exception:  # not inlinable (e.g. it writes the function's output): keep it
                continue
            blocks.pop(index)
            changed = True
            break
    return blocks


def _fma_risk(producer: Any, consumer: Any) -> bool:
    """Whether inlining `producer` into `consumer` would put a float multiply directly under an
    add or subtract: the pair LLVM fuses into one FMA (TVM compiles with FP op fusion on)."""
    import tvm_ffi
    from tvm import tirx
    from tvm.ir.expr import TensorLoad  # what tirx.BufferLoad builds

    body = producer.body
    if not (isinstance(body, tirx.BufferStore) and isinstance(body.value, tirx.Mul)
            and str(body.value.ty).startswith("float")):
        return False
    buffer = body.buffer
    found = False

    def visit(node: Any) -> None:
        nonlocal found
        found = found or any(isinstance(arg, TensorLoad) and arg.source.same_as(buffer)
                             for arg in (node.a, node.b))

    tvm_ffi.structural_walk(consumer.body, [(tirx.Add, visit), (tirx.Sub, visit)], order="post")
    return found


def _iterations(sch: Any, loops: list[Any]) -> int:
    total = 1
    for loop in loops:
        total *= _extent(sch, loop) or 1
    return total


def _weights_dominate(sch: Any, spatial: list[Any], reduce: list[Any]) -> bool:
    """Whether a reduction has fewer output pixels than terms per output (a late layer: 7x7
    pixels, 3x3x512 terms), so its weights outweigh its input."""
    pixels = terms = 1
    for loop in spatial[:-1]:
        pixels *= _extent(sch, loop) or 1
    for loop in reduce:
        terms *= _extent(sch, loop) or 1
    return pixels < terms


def _schedule_block(sch: Any, info: Any, vector_bits: int, rest: list[Any]) -> bool:
    """Schedule one block; False when its loops are not plain spatial and reduction loops. A
    reduction's elementwise consumer (its epilogue) is computed as each block of output is
    written back, and leaves `rest`, the blocks still to schedule."""
    block = info.block_rv
    loops = sch.get_loops(block)
    kinds = info.dom_kind()
    if not loops or "O" in kinds or len(kinds) != len(loops):
        return False
    spatial = [loop for loop, kind in zip(loops, kinds) if kind == "S"]
    reduce = [loop for loop, kind in zip(loops, kinds) if kind == "R"]
    if not spatial:
        return False
    stmt = sch.get(block)
    bits = int(stmt.writes[0].source.dtype.bits) if stmt.writes else 32
    lanes = max(vector_bits // max(bits, 8), 4)
    vector = None
    extent = _extent(sch, spatial[-1])
    if extent is not None:
        width = lanes
        while width > 1 and extent % width:
            width //= 2
        if width >= 4:
            spatial[-1], vector = sch.split(spatial[-1], factors=[None, width])
    unrolled = lanes_block = None
    if reduce and vector is not None:
        # Rows of pixels first (each weight vector loaded once for all of them), the vector's
        # own axis (several vectors of output channels per pixel) only where none divides.
        pixel_axes = [(index, _extent(sch, loop)) for index, loop in enumerate(spatial[:-1])]
        choices = [(index, rows) for rows in UNROLL for index, extent in pixel_axes
                   if extent is not None and extent >= rows and extent % rows == 0]
        last = _extent(sch, spatial[-1])
        choices += [(len(spatial) - 1, rows) for rows in UNROLL
                    if last is not None and last >= rows and last % rows == 0]
        if choices:
            index, rows = choices[0]
            spatial[index], unrolled = sch.split(spatial[index], factors=[None, rows])
            last = _extent(sch, spatial[-1])
            if index < len(spatial) - 1 and rows <= 7 and last is not None and last % 2 == 0:
                # and two vectors of output channels beside them: 2 x rows accumulators
                spatial[-1], lanes_block = sch.split(spatial[-1], factors=[None, 2])
    if reduce and vector is not None and len(spatial) > 1 and _weights_dominate(sch, spatial,
                                                                                 reduce):
        spatial.insert(0, spatial.pop())  # output channels outermost: each slice of weights
        # is read once for every pixel from cache, not once per pixel row from memory
    inner = [loop for loop in (unrolled, lanes_block, vector) if loop is not None]
    sch.reorder(*spatial, *reduce, *inner)
    serial: list[Any] = []
    if not reduce:  # an elementwise block: the cores share its outer loops, enough iterations
        # for every core, and each iteration runs the inner ones as plain loops (a fused loop
        # recomputes every index from one counter: a division per vector of a small row)
        while len(spatial) > 1 and _iterations(sch, spatial[:-1]) >= PARALLEL_ITERATIONS:
            serial.insert(0, spatial.pop())
    outer = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    sch.parallel(outer)
    for loop in (unrolled, lanes_block):
        if loop is not None:
            sch.unroll(loop)
    if vector is not None:
        sch.vectorize(vector)
        if reduce:
            accumulator = sch.cache_write(block, 0, "global")
            sch.reverse_compute_at(accumulator, outer)
            _fuse_epilogue(sch, accumulator, rest)
            sch.vectorize(sch.get_loops(accumulator)[-1])
    return True


def _fuse_epilogue(sch: Any, write_back: Any, rest: list[Any]) -> None:
    """Inline the one elementwise consumer of a reduction's output into the write-back of its
    accumulators, so the output goes out once, finished, instead of written whole and read back
    (an int8 depthwise convolution's int32 output, its requantization after it). The write-back
    only copies, so no float multiply comes to sit under an add."""
    consumers = sch.get_consumers(write_back)
    if len(consumers) != 1:
        return
    stmt = sch.get(consumers[0])
    epilogue = next((info for info in rest if sch.get(info.block_rv).same_as(stmt)), None)
    if epilogue is None or not epilogue.is_injective():
        return
    try:
        sch.reverse_compute_inline(consumers[0])
    except Exception:  # its reads do not map one to one onto the output (e.g. a transpose)
        return
    rest.remove(epilogue)
