"""Deploy and bench: the pipeline for one model on one device, and the fleet run over many.

Per device: connect (fail fast before compiling), read the device's info and check TVM versions,
build the artifact (cached), send it unless the device holds it, load, run once on the fixed
input, compare with PyTorch, benchmark on the device. A fleet run never stops halfway: every
(device, model) pair ends as one RunResult, ok or failed with its reason.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from hostkit.defaults import DEFAULT_REPEAT, DEFAULT_WARMUP
from hostkit.errors import ConnectError, EdgekitError, RemoteError
from hostkit.inventory import Device
from hostkit.models import LoadedModel, ModelSpec, load_model
from hostkit.report.results import Latency, RunResult
from hostkit.run.check import RTOL, Check, compare_outputs

if TYPE_CHECKING:
    from hostkit.build.targets import ResolvedTarget
    from hostkit.run.remote import DeviceSession

__all__ = ["RunOptions", "run_fleet", "run_on_device", "Step", "OnResult", "FleetInterrupted"]

log = logging.getLogger("edgekit")

Step = Callable[[str, str, str], None]  # (device, model, what is happening now)
OnResult = Callable[[RunResult], None]  # a row that is final


@dataclass(frozen=True)
class RunOptions:
    repeat: int = DEFAULT_REPEAT
    warmup: int = DEFAULT_WARMUP
    rtol: float = RTOL
    use_tuning: bool = True
    # Deploy a copy with one weight changed, against the unchanged reference: the check must fail.
    perturb: bool = False
    # Inferences to time kernel by kernel after the benchmark (0: no profile).
    profile_runs: int = 0
    # "cpp": also run the export bundle's C++ runner on the device (hostkit.run.cpp).
    runtime: str = "python"
    # Engines (hostkit.engines) to run on the device beside TVM (hostkit.run.baselines).
    baselines: tuple[str, ...] = ()


class _ModelCache:
    """Loads each model once per run and serialises compiles (they already use every core)."""

    def __init__(self) -> None:
        self._models: dict[ModelSpec, LoadedModel] = {}
        self._references: dict[ModelSpec, list] = {}
        self.lock = threading.Lock()
        self.compile_lock = threading.Lock()

    def get(self, spec: ModelSpec) -> tuple[LoadedModel, list]:
        with self.lock:
            if spec not in self._models:
                model = load_model(spec)
                self._models[spec] = model
                self._references[spec] = model.reference()
            return self._models[spec], self._references[spec]


class FleetInterrupted(KeyboardInterrupt):
    """Ctrl-C during a fleet run: `results` holds every row, finished or marked interrupted."""

    def __init__(self, results: list[RunResult]) -> None:
        super().__init__("interrupted")
        self.results = results


# Seconds an interrupted fleet run waits for its devices to let go of their sessions.
INTERRUPT_GRACE_S = 5.0


def run_fleet(devices: Sequence[Device], specs: Sequence[ModelSpec], options: RunOptions,
              step: Step | None = None, on_result: OnResult | None = None) -> list[RunResult]:
    """Every model on every device, devices in parallel; results in (device, model) order.

    `on_result` sees each row as soon as it is final, from the device's thread. On Ctrl-C the
    open sessions are cut (the daemons stop the abandoned work) and FleetInterrupted carries the
    rows finished so far, the others marked interrupted.
    """
    from hostkit.transport.relay import close_all_relays

    models = _ModelCache()
    rows = {d.name: [RunResult(device=d.name, model=s.name, emulated=d.emulated, requested=s.name)
                     for s in specs] for d in devices}
    workers = max(1, min(len(devices), 8))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="edgekit-dev")
    futures = [pool.submit(run_on_device, d, specs, options, models, step, on_result,
                           rows[d.name]) for d in devices]
    try:
        for future in futures:
            future.result()
    except KeyboardInterrupt:
        partial = [r for d in devices for r in rows[d.name]]
        final = {id(r) for r in partial if r.ok or r.error is not None}
        close_all_relays()
        pool.shutdown(wait=False, cancel_futures=True)
        wait(futures, timeout=INTERRUPT_GRACE_S)
        for result in partial:
            if id(result) not in final:
                result.status = "failed"
                result.error, result.stage = "interrupted (Ctrl-C) before it finished", "interrupted"
        raise FleetInterrupted(partial) from None
    pool.shutdown()
    return [r for d in devices for r in rows[d.name]]


def run_on_device(device: Device, specs: Sequence[ModelSpec], options: RunOptions,
                  models: _ModelCache | None = None, step: Step | None = None,
                  on_result: OnResult | None = None,
                  results: list[RunResult] | None = None) -> list[RunResult]:
    """Every model on one device; one RunResult each, whatever happens (see the module doc)."""
    from hostkit.build.compiler import cores_kept
    from hostkit.build.targets import check_cross_compiler, resolve_target

    models = models or _ModelCache()
    if results is None:
        results = [RunResult(device=device.name, model=s.name, emulated=device.emulated,
                             requested=s.name) for s in specs]
    note = step or (lambda *_: None)
    emit = _Emitter(on_result)
    try:
        note(device.name, "*", "resolving target")
        resolved = resolve_target(device)
        for result in results:
            result.target = resolved.describe()
        cross_cc = check_cross_compiler(device, resolved)
        if options.runtime == "cpp":
            _check_cpp(device, resolved)
        with cores_kept():  # a build's constant folding would pin this thread to one core
            _connect_and_run(device, specs, results, options, models, resolved, cross_cc, note,
                             emit)
    except EdgekitError as exc:
        for result in results:
            if result.status != "ok" and result.error is None:
                _fail(result, exc)
    except Exception as exc:  # a bug or an unmapped failure: still one row, never a crash
        log.exception("unexpected error on %s", device.name)
        for result in results:
            if result.status != "ok" and result.error is None:
                result.error, result.stage = f"unexpected error: {exc}", "internal"
    for result in results:
        emit(result)
    return results


class _Emitter:
    """Hands each row to `on_result` once, as soon as it is final."""

    def __init__(self, on_result: OnResult | None) -> None:
        self.on_result = on_result
        self.done: set[int] = set()

    def __call__(self, result: RunResult) -> None:
        if self.on_result is not None and id(result) not in self.done:
            self.done.add(id(result))
            self.on_result(result)


def _connect_and_run(device: Device, specs: Sequence[ModelSpec], results: list[RunResult],
                     options: RunOptions, models: _ModelCache, resolved: "ResolvedTarget",
                     cross_cc: str | None, note: Step, emit: Callable[[RunResult], None]) -> None:
    """Connect (retrying a transient failure with backoff, `retries` times), then run each model.

    Nothing is retried once a model started running on the device: a second try could measure
    a board in another state, and half of a benchmark is not a result.
    """
    from hostkit.build.targets import complete_from_device, for_device_cpu
    from hostkit.run.remote import DeviceSession, check_versions
    from hostkit.transport import make_transport

    for attempt in range(device.retries + 1):
        started = False
        try:
            note(device.name, "*", f"connecting to {device.address}")
            with make_transport(device) as transport:
                transport.notify = lambda what: note(device.name, "*", what)
                session = DeviceSession(transport, transport.session())
                try:
                    info = session.info()
                    check_versions(device.name, info)
                    resolved = complete_from_device(device, resolved, info)
                    started = True
                    for index, (spec, result) in enumerate(zip(specs, results)):
                        result.target = for_device_cpu(resolved, info).describe()
                        result.device_info = info
                        _run_one(session, device, spec, result, options, models, resolved,
                                 cross_cc, note)
                        if result.ok or result.error is not None:
                            emit(result)
                        if session.lost:  # the rest would fail the same way: say it once each
                            for rest in results[index + 1:]:
                                rest.error, rest.stage = result.error, result.stage
                                emit(rest)
                            break
                finally:
                    session.close()
            return
        except ConnectError as exc:
            if started or not exc.transient or attempt == device.retries:
                raise
            delay = min(2.0 ** attempt, 10.0)
            note(device.name, "*", f"{exc.message}; trying again in {delay:g}s "
                                   f"({attempt + 1} of {device.retries} retries)")
            time.sleep(delay)


def _check_cpp(device: Device, resolved: "ResolvedTarget") -> None:
    """What the C++ runner needs, checked before anything is compiled or connected: a way to
    start it on the device, and compilers for a linked library (the bundle's) and the runner."""
    from hostkit.build.targets import check_cross_compiler
    from hostkit.export.runner import cxx_for
    from hostkit.run.cpp import check_cpp_runnable

    check_cpp_runnable(device)
    linked = device.with_overrides(format="so")
    cxx_for(device, resolved, check_cross_compiler(linked, resolved, tar_fallback=False))


def _upload_progress(device: str, model: str, note: Step) -> Callable[[int, int], None]:
    """Report an upload in tenths: transports call back for every chunk they send."""
    shown = [-1]

    # Below a megabyte in kB: 0.1 MB steps would show a 130 kB upload only as 0.0 and 0.1 of 0.1.
    def progress(done: int, total: int) -> None:
        tenth = (10 * done) // total if total else 10
        if tenth != shown[0]:
            shown[0] = tenth
            if total >= 1_000_000:
                note(device, model, f"uploading {done / 1e6:.1f}/{total / 1e6:.1f} MB")
            else:
                note(device, model, f"uploading {done / 1e3:.0f}/{total / 1e3:.0f} kB")

    return progress


def _check_fits(device: str, model: str, library: int, params: int, workspace: int,
                available: int) -> None:
    """Refuse, before any upload, a model the device has no room for (0: the device did not say).

    The library is mapped, and its constants are copied into tensors at load: a model needs its
    library, its weights once more, and the VM's planned workspace for activations.
    """
    need = library + params + workspace
    if available and need > available:
        raise RemoteError(f"{model} needs about {need / 1e6:.0f} MB on the device (library "
                          f"{library / 1e6:.0f} MB + weights {params / 1e6:.0f} MB + workspace "
                          f"{workspace / 1e6:.0f} MB) but it has {available / 1e6:.0f} MB "
                          "available", device=device, stage="memory",
                          hint="free memory on the board, or deploy a smaller or int8 model")


def _detections_exactly(model: LoadedModel, outputs: list, check: Check,
                        rtol: float) -> tuple[Check, dict[str, object]]:
    """A detector's check, settled against the model evaluated in float64 when the float32
    reference disagrees: top-k and NMS pick among near-equal scores, and PyTorch's float32
    rounding and the device's may decide a near tie differently (seeded RetinaNet ranks 838,656
    close scores per level, and each float32 run's logits are up to 4.5e-4 from the exact ones).
    The device passes when it matches the exact answer; `check` then says so, with what float32
    PyTorch matched. A model that cannot run in float64 keeps its float32 check."""
    if check.detection is None or check.passed(rtol):
        return check, {}
    try:
        exact = model.exact_reference()
    except Exception:  # e.g. an operator without a float64 kernel: the float32 check stands
        log.debug("%s: no float64 reference", model.name, exc_info=True)
        return check, {}
    if exact is None:
        return check, {}
    again = compare_outputs(outputs, exact, model.family, model.output_names,
                            steps=model.host_steps())
    if not again.passed(rtol):
        return check, {}
    return again, {"reference": "float64", "float32_matched": check.detection.matched}


def _fail(result: RunResult, exc: EdgekitError) -> None:
    result.status = "failed"
    result.error = exc.message + (f" ({exc.hint})" if exc.hint else "")
    result.stage = exc.stage


def _run_one(session: "DeviceSession", device: Device, spec: ModelSpec, result: RunResult,
             options: RunOptions, models: _ModelCache, resolved: "ResolvedTarget",
             cross_cc: str | None,
             note: Callable[[str, str, str], None]) -> None:
    from hostkit.build.compiler import build_artifact
    from hostkit.build.targets import for_device_cpu
    from hostkit.build.tuning.records import records_for

    try:
        note(device.name, spec.name, "loading model")
        model, reference = models.get(spec)
        result.model = model.name
        original = model  # the baselines run the model as given, even when TVM's is perturbed
        if options.perturb:
            model, result.perturbed = model.perturbed(), True
        tuning = records_for(model, resolved) if options.use_tuning else None
        note(device.name, spec.name, "compiling (cached when unchanged)")
        with models.compile_lock:
            artifact = build_artifact(model, for_device_cpu(resolved, result.device_info),
                                      fmt=device.format, cross_compiler=cross_cc,
                                      tuning=tuning, device=device.name,
                                      kernels=device.cuda_kernels)
        result.artifact_sha256, result.artifact_bytes = artifact.sha256, artifact.size
        result.artifact_path = str(artifact.path)
        result.cached, result.compile_s = artifact.cached, artifact.compile_s
        result.tuned, result.records = artifact.tuned, artifact.records
        result.tuned_kernels = artifact.tuned_kernels
        result.precision = model.precision
        if model.quantization is not None:
            result.quantization = {**dataclasses.asdict(model.quantization), **(artifact.int8 or {})}

        params = model.params_bytes()
        workspace = artifact.workspace_bytes or 0
        result.memory = {"artifact_mb": round(artifact.size / 1e6, 2),
                         "params_mb": round(params / 1e6, 2),
                         "workspace_mb": round(workspace / 1e6, 2)}
        _check_fits(device.name, model.name, artifact.size, params, workspace,
                    int(result.device_info.get("memory_available_bytes") or 0))
        idle = session.memory()

        note(device.name, spec.name, f"uploading {artifact.size / 1e6:.1f} MB")
        sent, upload_s = session.ensure_artifact(artifact.path, artifact.sha256,
                                                 _upload_progress(device.name, spec.name, note))
        result.uploaded, result.upload_s = sent, upload_s

        note(device.name, spec.name, "loading on device")
        start = time.perf_counter()
        loaded = session.load(artifact.sha256, resolved.kind)
        result.load_s = time.perf_counter() - start

        note(device.name, spec.name, "first inference")
        outputs, first_ms = loaded.run(model.inputs)
        result.first_inference_ms = first_ms
        check = compare_outputs(outputs, reference, model.family, model.output_names,
                                steps=model.host_steps())
        check, against = _detections_exactly(model, outputs, check, options.rtol)
        result.check = {**check.details(), **against, "outputs": model.output_names}
        result.preprocessing = model.preprocessing
        result.max_abs_diff, result.rel_err = check.max_abs_diff, check.rel_err
        result.ref_max, result.cosine = check.ref_max, check.cosine
        result.top1_match, result.top5_match = check.top1_match, check.top5_match

        note(device.name, spec.name, f"benchmarking ({options.repeat} runs)")
        result.latency_ms = Latency.from_samples(loaded.benchmark(options.repeat, options.warmup))
        if loaded.cut is not None:
            result.runs_cut = (f"{loaded.cut[0]} of {loaded.cut[1]} runs: more would pass "
                               f"session_timeout ({device.session_timeout:g}s)")
            note(device.name, spec.name, f"benchmarked {result.runs_cut}")
        if options.profile_runs:
            from hostkit.run.profile import kernel_rows

            note(device.name, spec.name, f"profiling kernels ({options.profile_runs} runs)")
            raw = loaded.kernel_times(session.sess, options.profile_runs)
            result.profile = kernel_rows(raw, options.profile_runs, artifact.tuned,
                                         result.latency_ms.p50).to_json()
        busy = session.memory()
        if idle and busy:
            result.memory.update(idle_rss_mb=round(idle["rss_bytes"] / 1e6, 1),
                                 peak_rss_mb=round(busy["peak_bytes"] / 1e6, 1))
            result.memory_mb = round(max(0, busy["peak_bytes"] - idle["rss_bytes"]) / 1e6, 1)
        if not check.passed(options.rtol):
            raise RemoteError(check.reason(options.rtol), device=device.name, stage="check")
        source = getattr(model.quantization, "vs_source", None) or {}
        if source.get("top1") is False or source.get("top3") is False:
            raise RemoteError(f"{model.name}: int8 arithmetic changes the saved program's "
                              f"{'top-1' if source.get('top1') is False else 'top-3'} label "
                              f"(max abs diff {source['max_abs_diff']:.3g})",
                              device=device.name, stage="check")
        if options.runtime == "cpp":
            from hostkit.run.cpp import run_cpp

            note(device.name, spec.name, f"C++ runner: export, ship, run ({options.repeat} runs)")
            result.cpp, cpp_check = run_cpp(device, model, reference, options.repeat,
                                            options.warmup, options.use_tuning,
                                            export_lock=models.compile_lock)
            if not cpp_check.passed(options.rtol):
                raise RemoteError(f"C++ runner: {cpp_check.reason(options.rtol)}",
                                  device=device.name, stage="cpp-check")
        if options.baselines:
            from hostkit.run.baselines import fastest, run_baselines

            tvm_p50 = result.latency_ms.p50 if result.latency_ms else None
            result.baselines = run_baselines(
                session.sess, device.name, original, reference, options.baselines,
                options.repeat, options.warmup, tvm_p50, options.rtol, device.emulated,
                lambda what: note(device.name, spec.name, f"baseline {what}"))
            result.fastest = fastest(tvm_p50, result.baselines)
        result.status = "ok"
    except EdgekitError as exc:
        _fail(result, exc)
