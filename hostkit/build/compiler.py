"""The TVM adapter for building: ExportedProgram -> Relax -> compiled library on disk, cached.

An artifact's cache key covers the model's identity (architecture, weights, input shape), the
target, TVM's version, the export format, the linker and the tuning records applied, so a second
deploy of the same model to the same target reuses the library without compiling.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from devicekit.store import file_sha256
from hostkit.build.targets import ResolvedTarget
from hostkit.defaults import cache_dir
from hostkit.errors import CompileError, EdgekitError
from hostkit.models import LoadedModel

if TYPE_CHECKING:
    import tvm

__all__ = ["Artifact", "build_artifact", "import_relax", "file_sha256", "cores_kept",
           "PIPELINE_VERSION"]

# Bumped whenever the way edgekit compiles changes, so old cached artifacts are not reused.
PIPELINE_VERSION = 24


@contextlib.contextmanager
def cores_kept() -> Iterator[None]:
    """Keep this process on every core it may use while TVM works in it, and after.

    TVM's thread pool, started in the host by a build's constant folding or a tune's search,
    binds the calling thread to one core (`TVM_BIND_THREADS`), and every process started after
    inherits that: a tune's builder workers compiled candidates on one core of two, and a local
    daemon started after a tune ran every engine on one core (measured: ResNet-18 TVM 11.9 -> 25.8 ms, ONNX Runtime 10.7 -> 21.2 ms
    after two minutes of tuning in the same process). Unbound threads, and the affinity the
    process had restored, keep both."""
    os.environ.setdefault("TVM_BIND_THREADS", "0")  # read when TVM's pool first starts
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not Linux: no affinity to keep
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, cpus)


@dataclass(frozen=True)
class Artifact:
    path: Path
    sha256: str
    cached: bool
    compile_s: float
    tuned: bool
    records: str | None
    fmt: str
    tuned_kernels: str | None = None  # "covered/tunable" when records were applied
    int8: dict[str, Any] | None = None  # int8 builds: layers lowered to int8, layers left fp32
    workspace_bytes: int | None = None  # the VM's planned intermediate memory (static estimate)

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def import_relax(model: LoadedModel,
                 target: "tvm.target.Target | None" = None) -> "tvm.IRModule":
    """Import the model into Relax with weights bound as constants (they ship inside the .so).

    An int8 model's quantized layers are lowered to int8 kernels here, so tuning and building see
    the same module; `target` decides whether its 1x1 convolutions get VNNI kernels.
    """
    mod, _ = import_with_report(model, target)
    return mod


def import_with_report(model: LoadedModel, target: "tvm.target.Target | None" = None,
                       ) -> tuple["tvm.IRModule", dict[str, Any] | None]:
    """`import_relax`, plus for an int8 model what was lowered to int8 and what stayed fp32."""
    from hostkit.build.relax_import import to_relax

    program = model.exported()
    try:
        mod = to_relax(program)
    except Exception as exc:
        raise CompileError(_import_error(model.name, exc, program), stage="import") from exc
    if model.precision != "int8":
        return mod, None
    from hostkit.build.int8 import lower_int8

    mod, lowering = lower_int8(mod, target)
    return mod, {"int8_layers": lowering.int8, "vnni_layers": lowering.vnni,
                 "fp32_layers": lowering.fp32}


def _import_error(name: str, exc: Exception, program: Any = None) -> str:
    text = str(exc)
    if "InputKind.TOKEN" in text:
        effects = _effectful_ops(program)
        named = f"operator(s) with side effects ({', '.join(effects)})" if effects else \
            "an operator with side effects"
        return (f"{name}: TVM's PyTorch importer cannot take {named}: torch.export threads them "
                "with effect tokens; rewrite that layer (e.g. torch.linalg.inv checks its input "
                "for errors, an effect)")
    if "Unsupported function type" in text or "not supported" in text.lower():
        ops = text.split("[", 1)[1].split("]", 1)[0] if "[" in text else text.splitlines()[0]
        return (f"{name}: TVM's PyTorch importer does not support operator(s) {ops}; "
                "rewrite that layer or report it to apache/tvm")
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    return f"{name}: import to Relax failed: {first[:300]}"


def planned_workspace_bytes(mod: "tvm.IRModule", target: ResolvedTarget) -> int | None:
    """The intermediate tensors' memory after the VM's static memory planning, in bytes (TVM's
    own estimate, which adds every planned allocation of main; None when it cannot tell)."""
    import re

    import tvm
    from tvm import relax
    from tvm.relax import transform as rt

    try:
        with target.target:
            planned = tvm.transform.Sequential([
                rt.LegalizeOps(), rt.ToNonDataflow(), rt.RemovePurityChecking(),
                rt.CallTIRRewrite(), rt.StaticPlanBlockMemory()])(mod)
        text = relax.analysis.estimate_memory_usage(planned)
    except Exception:  # an estimate only: a module it cannot plan still builds
        return None
    found = re.search(r"With memory planning, .*? total size ([0-9.e+-]+) GB", text)
    return int(float(found.group(1)) * 1e9) if found else None


def _effectful_ops(program: Any) -> list[str]:
    """The operators torch.export wraps in effect tokens once decomposed, as `aten.op` names."""
    try:
        decomposed = program.run_decompositions()
    except Exception:
        return []
    found = [str(node.args[1]).removesuffix(".default") for node in decomposed.graph.nodes
             if node.op == "call_function" and "with_effects" in str(node.target)]
    return list(dict.fromkeys(found))


def _cache_key(model: LoadedModel, target: ResolvedTarget, fmt: str, cc: str | None,
               records: str | None, kernels: str | None = None) -> str:
    import tvm

    payload = {
        "model": model.identity,
        "target": target.to_json(),
        "tvm": tvm.__version__,
        "format": fmt,
        "cc": cc,
        "records": records,
        "pipeline": PIPELINE_VERSION,
    }
    if kernels is not None:  # CUDA targets only, so CPU artifacts keep their keys
        payload["kernels"] = kernels
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def build_artifact(model: LoadedModel, target: ResolvedTarget, *, fmt: str = "so",
                   cross_compiler: str | None = None, tuning: Any = None,
                   device: str | None = None, kernels: str = "cubin") -> Artifact:
    """The compiled library for (model, target): from the cache, or compiled and cached now.

    `tuning` is a `hostkit.build.tuning.records.TuningRecords` or None; when it has records for this
    workload they are applied and the artifact is marked tuned. A CUDA target's kernels are
    compiled here for its `arch`, as `kernels` says (cubin, or PTX for newer GPUs to compile).
    """
    from hostkit.build import cuda

    records_id = tuning.fingerprint() if tuning is not None and tuning.exists() else None
    is_cuda = target.kind == "cuda"
    pack = None
    if is_cuda:
        try:
            pack = cuda.pack_imports_compiled(cuda.cuda_arch(target.target), kernels)
        except CompileError as exc:
            exc.device = device
            raise
    key = _cache_key(model, target, fmt, cross_compiler, records_id, kernels if is_cuda else None)
    folder = cache_dir() / "artifacts" / key
    lib = folder / f"model.{fmt}"
    meta_path = folder / "meta.json"
    if lib.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        return Artifact(path=lib, sha256=meta["sha256"], cached=True, compile_s=0.0,
                        tuned=meta["tuned"], records=meta.get("records"), fmt=fmt,
                        tuned_kernels=meta.get("tuned_kernels"), int8=meta.get("int8"),
                        workspace_bytes=meta.get("workspace_bytes"))

    start = time.perf_counter()
    # records carry the device's CPU (`mcpu`); the int8 lowering must see the target they build for
    lowering = tuning.tuned_target(target.target) if records_id is not None else target.target
    mod, int8 = import_with_report(model, lowering)
    tuned, coverage = False, None
    try:
        with cuda.kernels_from_source() if is_cuda else contextlib.nullcontext():
            if records_id is not None:
                executable, coverage = tuning.compile(mod, target.target,
                                                      exact=model.precision == "int8")
                tuned = coverage.tuned > 0
            else:
                from hostkit.build.cpu_schedule import compile_untuned

                executable = compile_untuned(mod, target.target,
                                             exact=model.precision == "int8")
    except EdgekitError:  # already one line for the user (e.g. records from another TVM)
        raise
    except Exception as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
        raise CompileError(f"compiling {model.name} for {target.describe()} failed: {first[:300]}",
                           device=device, stage="compile") from exc
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key[:12]}.", dir=folder.parent))
    try:
        _export(executable, staging / lib.name, fmt, cross_compiler, device, pack)
        sha = file_sha256(staging / lib.name)
        compile_s = time.perf_counter() - start
        meta = {"sha256": sha, "model": model.name, "target": target.to_json(), "format": fmt,
                "tuned": tuned, "records": records_id if tuned else None, "compile_s": compile_s,
                "tuned_kernels": str(coverage) if coverage is not None else None, "int8": int8,
                "workspace_bytes": planned_workspace_bytes(mod, target)}
        (staging / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        if folder.exists():  # a concurrent build of the same key won; keep the existing one
            shutil.rmtree(staging)
        else:
            os.replace(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    return Artifact(path=lib, sha256=meta["sha256"], cached=False, compile_s=compile_s,
                    tuned=meta["tuned"], records=meta.get("records"), fmt=fmt,
                    tuned_kernels=meta.get("tuned_kernels"), int8=meta.get("int8"),
                    workspace_bytes=meta.get("workspace_bytes"))


def _export(executable: Any, path: Path, fmt: str, cross_compiler: str | None,
            device: str | None, pack: Any = None) -> None:
    """Write the library; `pack` packs its imported modules (a CUDA target's compiled kernels)."""
    extra = {"fpack_imports": pack} if pack is not None else {}
    try:
        if fmt == "tar":
            executable.export_library(str(path), **extra)
        elif cross_compiler:
            from tvm.support import cc

            executable.export_library(str(path), fcompile=cc.cross_compiler(cross_compiler),
                                      **extra)
        else:
            executable.export_library(str(path), **extra)
    except EdgekitError as exc:  # the kernels did not compile: already one line
        exc.device = exc.device or device
        raise
    except Exception as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise CompileError(f"linking the library failed: {' | '.join(lines[-3:])[:400]}",
                           device=device, stage="export") from exc
