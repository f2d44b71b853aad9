"""Tuning records: MetaSchedule databases kept per target and model, applied by deploy and bench.

Records live under `<cache>/tuning/<target key>/<model key>/` as MetaSchedule's JSON database
(`database_workload.json`, `database_tuning_record.json`) plus `target.json`, the exact target the
records were tuned for: the inventory's target refined with what the device reported (its core
count, and its CPU where edgekit can name it for LLVM), so deploy compiles for the same target the
candidates were measured on. Deploy applies the records automatically when they exist; the
artifact cache key includes their fingerprint (target.json included), so new records mean a new
build.

Tuning and compiling share one Relax preparation (`prepare_module`), because MetaSchedule finds a
record by the structure of each fused TIR function: any pass that differs between the two would
silently leave kernels untuned (`PREPARATION` names the preparation in the records' path, so records
made by an earlier one are never looked up, and the build counts the kernels the records covered).
The preparation folds batch norm into the convolutions before anything else, converts convolutions
to NHWC (channels innermost: the output channels are what the CPU's vector lanes run over; on
ResNet-18 the same 128 trials gave 1.3x faster 3x3 and 1.6x faster 7x7 convolutions than NCHW),
puts every float convolution it can on edgekit's own direct kernel (`hostkit.build.direct`,
scheduled by hand, so the tune's time goes to the kernels left), marks the other weights
(constants) as layout-free so the tuner may choose a blocked weight layout, and
after tuning the layout rewrite of each weight is folded into a new constant: the library's `main`
still takes the input alone. Kernels are matched by their anchor block (the convolution), so a
convolution tuned once serves every epilogue it appears with (bias, residual add, ReLU).

A second preparation (`WINOGRAD`, `edgekit tune --winograd`) computes the 3x3 stride-1
convolutions as Winograd F(4x4, 3x3) (`hostkit.build.winograd`); its records live in a folder of
their own, and a build applies the model's records whose tune estimated the faster model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hostkit.build.targets import ResolvedTarget, llvm_cpu_for
from hostkit.defaults import cache_dir
from hostkit.errors import TuneError
from hostkit.models import LoadedModel

if TYPE_CHECKING:
    import tvm

__all__ = ["TuningRecords", "Coverage", "records_for", "RECORD_FILES", "TARGET_FILE",
           "VERSION_FILE", "META_FILE", "PREPARATION", "WINOGRAD", "PREPARATIONS",
           "MODULE_EQUALITY", "open_database", "prepare_module", "device_target",
           "target_key", "target_text", "tuning_root", "records_dir_name"]

RECORD_FILES = ("database_workload.json", "database_tuning_record.json")
# The Relax preparations records belong to; change a name whenever its `prepare_module` changes.
PREPARATION = "nhwc-direct-5"  # convolutions on edgekit's kernels: direct, Winograd, depthwise
WINOGRAD = "nhwc-winograd4-2"  # 3x3 stride-1 convolutions as Winograd F(4x4, 3x3)
PREPARATIONS = (PREPARATION, WINOGRAD)
# How MetaSchedule tells two kernels are the same task (tuning and applying must agree).
MODULE_EQUALITY = "anchor-block"
TARGET_FILE = "target.json"
VERSION_FILE = "tvm_version"  # the TVM that wrote the records
# What `edgekit records list` shows: the model, trials and minutes spent, the best estimate, and the
# records taken from other models. Not part of the fingerprint: it describes, it is not applied.
META_FILE = "meta.json"

@dataclass(frozen=True)
class TuningRecords:
    work_dir: Path

    @property
    def preparation(self) -> str:
        """The preparation the records were tuned with: the folder's name says it."""
        name = self.work_dir.name
        return next((p for p in PREPARATIONS if name.endswith(f"-{p}")), PREPARATION)

    def exists(self) -> bool:
        records = self.work_dir / RECORD_FILES[1]
        return records.exists() and records.stat().st_size > 0

    def count(self) -> int:
        if not self.exists():
            return 0
        with open(self.work_dir / RECORD_FILES[1], encoding="utf-8") as handle:
            return sum(1 for line in handle if line.strip())

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for name in (*RECORD_FILES, TARGET_FILE):
            path = self.work_dir / name
            if path.exists():
                digest.update(path.read_bytes())
        return f"{self.work_dir.parent.name}/{self.work_dir.name}@{digest.hexdigest()[:12]}"

    def meta(self) -> dict[str, Any]:
        """What tunes wrote about these records (empty for records made before meta.json)."""
        path = self.work_dir / META_FILE
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return meta if isinstance(meta, dict) else {}

    def own_count(self) -> int:
        """Records this model's tunes measured, without those taken from other models."""
        return max(0, self.count() - int(self.meta().get("borrowed_records", 0)))

    def write_meta(self, meta: dict[str, Any]) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.work_dir / f"{META_FILE}.tmp"
        tmp.write_text(json.dumps(meta, sort_keys=True, indent=2), encoding="utf-8")
        tmp.replace(self.work_dir / META_FILE)

    def save_target(self, target: "tvm.target.Target") -> None:
        import tvm

        self.work_dir.mkdir(parents=True, exist_ok=True)
        (self.work_dir / TARGET_FILE).write_text(target_text(target), encoding="utf-8")
        (self.work_dir / VERSION_FILE).write_text(tvm.__version__, encoding="utf-8")

    def check_version(self) -> None:
        """Refuse records another TVM wrote: its schedules and JSON need not mean the same here."""
        import tvm

        path = self.work_dir / VERSION_FILE
        if not path.exists():
            return
        theirs = path.read_text(encoding="utf-8", errors="replace").strip()[:40]
        if theirs != tvm.__version__:
            raise TuneError(f"tuning records in {self.work_dir} were made with TVM {theirs}; this "
                            f"is TVM {tvm.__version__}", stage="records",
                            hint="tune again, or deploy with --no-tuning")

    def tuned_target(self, fallback: "tvm.target.Target") -> "tvm.target.Target":
        """The target the records were tuned for; `fallback` for records older than target.json."""
        import tvm

        self.check_version()
        path = self.work_dir / TARGET_FILE
        if not path.exists():
            return fallback
        try:
            return tvm.target.Target(json.loads(path.read_text(encoding="utf-8")))
        except Exception as exc:  # a hand-edited or foreign file: say which one
            raise TuneError(f"{path} does not hold a target TVM accepts: {exc}",
                            stage="records") from exc

    def compile(self, mod: "tvm.IRModule", target: "tvm.target.Target",
                exact: bool = False) -> tuple[Any, "Coverage"]:
        """Compile with the records applied; returns (executable, which kernels they covered).

        The kernels no record covers (a tune stopped by its time budget, a task that found no
        valid candidate) get the untuned builds' default schedule, so a partly tuned model is
        never slower than an untuned one for want of threads and vectors; `exact` as there."""
        import tvm

        tuned_target = self.tuned_target(target)
        with tuned_target:
            prepared = prepare_module(mod, tuned_target, self.preparation)
            applied, coverage = apply_records(prepared, self.work_dir)
            applied = schedule_uncovered(applied, tuned_target, exact)
        from hostkit.build.targets import wide_vectors

        return tvm.compile(applied, wide_vectors(tuned_target)), coverage


def schedule_uncovered(mod: "tvm.IRModule", target: "tvm.target.Target",
                       exact: bool = False) -> "tvm.IRModule":
    """`mod` with every kernel no record scheduled given the untuned builds' default schedule
    (an LLVM target's; any other's as it is). Call it inside `with target`."""
    if str(target.kind.name) != "llvm":
        return mod
    from tvm.s_tir import dlight

    from hostkit.build.cpu_schedule import default_schedule

    scheduled: "tvm.IRModule" = dlight.ApplyDefaultSchedule(default_schedule(exact))(mod)
    return scheduled


@dataclass(frozen=True)
class Coverage:
    """How many of a module's tunable kernels got a schedule from the records."""

    tuned: int
    total: int

    def __str__(self) -> str:
        return f"{self.tuned}/{self.total}"


def prepare_module(mod: "tvm.IRModule", target: "tvm.target.Target",
                   preparation: str = PREPARATION) -> "tvm.IRModule":
    """The fused module whose TIR functions are tuned, and later looked up in the records.

    Batch norm is folded into the preceding convolution's weights while it is still one op
    (FoldBatchnormToConv2D needs the un-decomposed op), so each conv block becomes one kernel with
    a bias-add and ReLU epilogue. Convolutions then run in NHWC (ReLU6 rewritten first so it
    follows them), and the layout conversions of the weights, like every other computation on
    constants, are folded before fusion: only the input and the output are transposed, once each.
    The layout-free mark lets MetaSchedule rewrite weight layouts. With the `WINOGRAD`
    preparation the eligible convolutions are legalized as Winograd kernels instead.
    """
    from tvm import relax, transform
    from tvm.relax import transform as rt

    from hostkit.build.rewrite import clips_as_min_max

    with target:
        folded = transform.Sequential([
            rt.FoldBatchnormToConv2D(),
            rt.FoldConstant(),  # ConvertLayout crashes on the folded weights' unevaluated math
        ])(mod)
        # The OHWI weights must be constants, not transposes of them, for the build-time weight
        # transforms (Winograd's, the direct kernel's packing).
        converted = transform.Sequential([
            rt.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"]}),
            rt.DecomposeOpsForInference(),
            rt.CanonicalizeBindings(),
            rt.FoldConstant(),
        ])(clips_as_min_max(folded))
        if preparation == WINOGRAD:
            from hostkit.build.winograd import winograd_legalize_map

            legalized = rt.LegalizeOps(customize_legalize_map=winograd_legalize_map())(converted)
        else:
            from hostkit.build.direct import direct_convolutions
            from hostkit.build.expansion import fused_expansions
            from hostkit.build.gemv import matrix_vector_products

            legalized = rt.LegalizeOps()(matrix_vector_products(
                direct_convolutions(fused_expansions(converted, target), target), target))
        return _map_kernels(transform.Sequential([
            rt.AnnotateTIROpPattern(),
            rt.FoldConstant(),
            rt.FuseOps(),
            rt.FuseTIR(),
            rt.AttachAttrLayoutFreeBuffers(),
            relax.transform.DeadCodeElimination(),
        ])(legalized), lambda func: _hand_scheduled(_layout_free_weights_only(func), target))


def _hand_scheduled(func: "tvm.tirx.PrimFunc",
                    target: "tvm.target.Target") -> "tvm.tirx.PrimFunc":
    """A kernel edgekit schedules by hand, scheduled and marked so: tuning leaves it as it is.
    Those are the direct convolutions (`hostkit.build.direct`: near the machine's peak, where
    MetaSchedule's best after 30 minutes reached half of it), the int8 VNNI matmuls with their
    fused requantization (MetaSchedule's generic rules would not use `vpdpbusd`) and the int8
    window gathers (after a 6-minute MobileNetV2 int8 tune its best gather took 0.74 ms where
    the default schedule's takes 0.2)."""
    from hostkit.build.cpu_schedule import _schedule, _vector_bits, direct_schedule, vnni_schedule
    from hostkit.build.vnni import IM2COL

    if func.attrs is not None and "tirx.is_scheduled" in func.attrs:  # written scheduled
        return func
    sch = vnni_schedule(func, _vector_bits(target)) or direct_schedule(func, target)
    if sch is None and f'"{IM2COL}"' in func.script():
        sch = _schedule(func, _vector_bits(target), exact=True)
    if sch is None:
        return func
    scheduled: "tvm.tirx.PrimFunc" = sch.mod["main"]
    return scheduled.with_attr("tirx.is_scheduled", True).without_attr("layout_free_buffers")


def _map_kernels(mod: "tvm.IRModule", rewrite: Any) -> "tvm.IRModule":
    import tvm
    from tvm import tirx

    return tvm.IRModule({gv: rewrite(func) if isinstance(func, tirx.PrimFunc) else func
                         for gv, func in mod.functions.items()}, attrs=mod.attrs)


def _layout_free_weights_only(func: "tvm.tirx.PrimFunc") -> "tvm.tirx.PrimFunc":
    """A kernel without a reduction (no anchor block: no weights) keeps no layout-free buffer.

    A tuned layout pays off for a convolution's or a matmul's weights; in an elementwise kernel
    it gains nothing, and MetaSchedule's layout rewrite miscompiles a constant such a kernel
    slices: the int8 VNNI matmul's output comes padded to 32 channels, and for the kernel that
    subtracts its 32 zero-point offsets and keeps 24 channels, the rewrite copied offset `i` to
    `i % 24`, so offsets 24..31 overwrote 0..7 (tuned int8 MobileNetV2: rel_err 0.54).
    """
    import tvm
    from tvm.s_tir.analysis import find_anchor_sblock

    if func.attrs is None or "layout_free_buffers" not in func.attrs:
        return func
    if find_anchor_sblock(tvm.IRModule({"main": func})) is not None:
        return func
    return func.without_attr("layout_free_buffers")


def binds_run_time_sizes(mod: "tvm.IRModule") -> bool:
    """Whether `main` binds sizes known only at run time (`match_cast`: a detector's count of
    boxes NMS kept). The tuning preparation loses such bindings (TVM's batch norm folding drops
    them); with SSDlite's kept, its tuned library still crashed its daemon."""
    from tvm import relax

    return any(isinstance(binding, relax.MatchCast)
               for block in mod["main"].body.blocks for binding in block.bindings)


def apply_records(prepared: "tvm.IRModule", work_dir: Path) -> tuple["tvm.IRModule", Coverage]:
    """Schedules from the records, then each weight's layout rewrite folded into a constant."""
    from tvm import transform
    from tvm.relax import transform as rt

    with open_database(work_dir):  # the pass takes the current one (its work_dir: "structural")
        scheduled = rt.MetaScheduleApplyDatabase()(prepared)
    coverage = Coverage(tuned=len(_scheduled(scheduled)) - len(_scheduled(prepared)),
                        total=len(_kernels(prepared)) - len(_scheduled(prepared)))
    return transform.Sequential([
        rt.SplitLayoutRewritePreproc(),
        rt.FoldConstant(),
        rt.DeadCodeElimination(),
    ])(scheduled), coverage


def open_database(work_dir: Path | str) -> Any:
    """The records as MetaSchedule's database, matching kernels the way tuning matched them."""
    from tvm.s_tir import meta_schedule as ms

    try:
        return ms.database.JSONDatabase(work_dir=str(work_dir), module_equality=MODULE_EQUALITY)
    except Exception as exc:  # a record whose schedule no longer applies to its kernel
        raise TuneError(f"the tuning records in {work_dir} cannot be read: MetaSchedule "
                        f"failed replaying one ({str(exc).splitlines()[0][:120]})",
                        stage="records",
                        hint=f"remove {work_dir} and tune again, or deploy with --no-tuning"
                        ) from exc


def _kernels(mod: "tvm.IRModule") -> list[Any]:
    from tvm import tirx

    return [func for func in mod.functions.values() if isinstance(func, tirx.PrimFunc)]


def _scheduled(mod: "tvm.IRModule") -> list[Any]:
    return [func for func in _kernels(mod)
            if func.attrs is not None and func.attrs.get("tirx.is_scheduled", False)]


def target_text(target: "tvm.target.Target") -> str:
    """The target as `target.json` holds it: equal texts mean the same target."""
    return json.dumps(_target_dict(target), sort_keys=True, indent=2)


def _target_dict(target: "tvm.target.Target") -> dict[str, Any]:
    """The target as plain JSON data that `tvm.target.Target` accepts back (keys follow kind)."""
    plain = _plain(target.export())
    return {k: v for k, v in plain.items() if k not in ("keys", "tag")}


def _plain(value: Any) -> Any:
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if isinstance(value, str):
        return str(value)
    if hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or hasattr(value, "__len__"):
        return [_plain(v) for v in value]
    if hasattr(value, "value"):  # IntImm / FloatImm
        return value.value
    return str(value)


def device_target(resolved: ResolvedTarget, info: dict[str, Any]) -> "tvm.target.Target":
    """The inventory's target, with `num-cores` and `mcpu` from the device where it names none."""
    import tvm

    spec = _target_dict(resolved.target)
    if spec.get("kind") == "cuda":
        return _cuda_target(spec, info)
    if spec.get("kind") != "llvm":
        return resolved.target
    if not spec.get("num-cores") and int(info.get("cores") or 0) > 0:
        spec["num-cores"] = int(info["cores"])
    if not spec.get("mcpu"):
        mcpu = llvm_cpu_for(info)
        if mcpu:
            spec["mcpu"] = mcpu
    return tvm.target.Target(spec)


def _cuda_target(spec: dict[str, Any], info: dict[str, Any]) -> "tvm.target.Target":
    """A CUDA target with the limits MetaSchedule's GPU rules schedule by (threads and shared
    memory per block, warp size), from the device's first GPU where the target names none."""
    import tvm

    gpus = [g for g in info.get("gpus") or [] if isinstance(g, dict)]
    if gpus:
        for key, reported in (("max_threads_per_block", "max_threads_per_block"),
                              ("max_shared_memory_per_block", "max_shared_memory_per_block"),
                              ("thread_warp_size", "warp_size")):
            if not spec.get(key) and int(gpus[0].get(reported) or 0) > 0:
                spec[key] = int(gpus[0][reported])
    missing = [key for key in ("max_threads_per_block", "max_shared_memory_per_block")
               if not spec.get(key)]
    if missing:
        raise TuneError(f"tuning a CUDA target needs its GPU's {' and '.join(missing)}, and the "
                        "device reports no GPU; name them in the target (e.g. "
                        "max_threads_per_block: 1024, max_shared_memory_per_block: 49152)",
                        stage="tune")
    return tvm.target.Target(spec)


def target_key(resolved: ResolvedTarget) -> str:
    """The folder of the records of every model on an inventory target."""
    text = json.dumps(resolved.to_json(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tuning_root() -> Path:
    return cache_dir() / "tuning"


def records_dir_name(identity: str, preparation: str = PREPARATION) -> str:
    return f"{identity[:16]}-{preparation}"


def records_for(model: LoadedModel, resolved: ResolvedTarget,
                preparation: str | None = None) -> TuningRecords:
    """Where the records of this model on this target live (they may not exist yet).

    With a `preparation`, that preparation's records; without, the records a build applies:
    of the preparations with records, the one whose tune estimated the faster model (the
    direct one where no estimate says otherwise).
    """
    folder = tuning_root() / target_key(resolved)
    if preparation is not None:
        return TuningRecords(folder / records_dir_name(model.identity, preparation))
    candidates = [TuningRecords(folder / records_dir_name(model.identity, p))
                  for p in PREPARATIONS]
    tuned = [r for r in candidates if r.exists()]
    if len(tuned) < 2:
        return tuned[0] if tuned else candidates[0]
    return min(tuned, key=lambda r: float(r.meta().get("estimated_ms") or float("inf")))
