"""The search: MetaSchedule builds candidates here and times them on the device.

Candidates are compiled on the host for the device's target (linked with the cross compiler when
the device's architecture differs) and measured on the device by MetaSchedule's RPC runner, which
the run stage (`hostkit.run.tune`) points at the device through the same transport deploy uses.
Records accumulate in the model's JSON database (`records.records_for`), written as each batch is
measured: an interrupted tune resumes from it, with the search seeded from the best records and
only the remaining trials run.

Two traps of MetaSchedule's defaults are avoided here. Its builder imports every tensor intrinsic
in each fresh worker (about 30 s, longer than its 30 s timeout), so every build timed out and a tune
"finished" with nothing measured; edgekit's build function skips that import (the scheduled TIR it
receives is already tensorized). And a tune that measured no valid candidate is a TuneError, never
a success.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

from hostkit.build.cuda import cuda_arch, kernels_from_source
from hostkit.errors import TuneError, device_part
from hostkit.inventory import Device

if TYPE_CHECKING:
    import tvm
    from rich.console import Console

__all__ = ["TuneStats", "extract_tasks", "make_runner", "run_tuner", "kernel_profile",
           "describe_target", "BUILD_TIMEOUT_S", "RUN_TIMEOUT_S"]

# One candidate's compile and link on the host; a kernel that takes longer is not worth keeping.
BUILD_TIMEOUT_S = 60.0
# One candidate's measurement on the device, session set-up and upload included.
RUN_TIMEOUT_S = 60.0
# Each of a candidate's REPEATS measurements runs it for at least MIN_REPEAT_MS and averages.
MIN_REPEAT_MS = 15
REPEATS = 2
TRIALS_PER_ITER = 64
# The evolutionary search's population and generations per round. MetaSchedule's defaults (512, 4)
# spent 18 s of a 40 s round searching on 2 cores; these spend 6 s, and on ResNet-18's layer-3
# convolution reached the same kernel (1.26 ms) in the same time with 50% more trials measured.
POPULATION = 256
GENERATIONS = 2


@dataclass
class TuneStats:
    """What the tuner has done so far, per task and in total; drives the progress display."""

    names: list[str]
    weights: list[float]
    started: float = field(default_factory=time.monotonic)
    trials: int = 0
    valid: int = 0
    build_errors: int = 0
    run_errors: int = 0
    best_s: dict[int, float] = field(default_factory=dict)
    first_error: str | None = None
    budget_spent: bool = False

    def record(self, task_id: int, builder_results: list[Any], runner_results: list[Any]) -> None:
        for built, ran in zip(builder_results, runner_results):
            self.trials += 1
            if built.error_msg is not None:
                self.build_errors += 1
                self.first_error = self.first_error or _first_line(built.error_msg)
                continue
            if ran.error_msg is not None or not ran.run_secs:
                self.run_errors += 1
                self.first_error = self.first_error or _first_line(str(ran.error_msg))
                continue
            self.valid += 1
            secs = sum(float(s) for s in ran.run_secs) / len(ran.run_secs)
            if secs < self.best_s.get(task_id, float("inf")):
                self.best_s[task_id] = secs

    def estimate_ms(self) -> float | None:
        """The model's latency if each task ran at its best measured speed (all tasks measured)."""
        if len(self.best_s) < len(self.names):
            return None
        return sum(self.weights[i] * s for i, s in self.best_s.items()) * 1e3

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def _first_line(text: str) -> str:
    lines = device_part([ln.strip() for ln in text.splitlines() if ln.strip()])
    errors = [ln for ln in lines if "Error" in ln or "Timeout" in ln]
    return (errors[-1] if errors else lines[0] if lines else "unknown error")[:300]


def kernel_profile(tasks: list[Any], work_dir: str) -> list[dict[str, Any]]:
    """Each task's best measured kernel from the records, the most time per inference first.

    `count` is how often the kernel runs per inference, `best_ms` its best time on the device
    (None when no candidate of it was measured), `gflops` its arithmetic rate at that time.
    """
    from tvm.s_tir.analysis import estimate_tir_flops

    from hostkit.build.tuning.records import open_database

    database = open_database(work_dir)
    rows = []
    for task in tasks:
        mod = task.dispatched[0]
        best = None
        if database.has_workload(mod):
            top = database.get_top_k(database.commit_workload(mod), 1)
            if top and top[0].run_secs:
                best = sum(float(s) for s in top[0].run_secs) / len(top[0].run_secs)
        flops = float(estimate_tir_flops(mod))
        rows.append({"kernel": task.task_name, "count": int(task.weight),
                     "best_ms": float(f"{best * 1e3:.4g}") if best else None,
                     "gflops": round(flops / best / 1e9, 1) if best and flops else None})
    return sorted(rows, key=lambda r: -(r["count"] * (r["best_ms"] or float("inf"))))


def describe_target(target: "tvm.target.Target") -> str:
    attrs = target.attrs
    parts = [str(target.kind.name)]
    for key in ("mtriple", "mcpu", "num-cores"):
        if key in attrs and attrs[key]:
            parts.append(f"{key}={attrs[key]}")
    return " ".join(parts)


def _is_scheduled(task: Any) -> bool:
    """A kernel that came scheduled (the int8 VNNI matmuls): the mark is on the module, or only
    on its function, which is how a hand-scheduled PrimFunc's mark survives task extraction."""
    if task.mod.attrs.get("tirx.is_scheduled", False):
        return True
    return any(func.attrs is not None and func.attrs.get("tirx.is_scheduled", False)
               for func in task.mod.functions.values())


def extract_tasks(prepared: "tvm.IRModule", target: "tvm.target.Target", device: str) -> list[Any]:
    from tvm.s_tir import meta_schedule as ms

    from hostkit.build.tuning.records import MODULE_EQUALITY

    try:
        tasks = ms.relax_integration.extract_tasks(prepared, target,
                                                    module_equality=MODULE_EQUALITY)
    except Exception as exc:
        raise TuneError(f"extracting tuning tasks failed: {_first_line(str(exc))}", device=device,
                        stage="tune") from exc
    tasks = [t for t in tasks if not _is_scheduled(t)]
    if not tasks:
        raise TuneError("the model has no kernel MetaSchedule can tune", device=device,
                        stage="tune")
    counts = _calls_per_task(prepared, tasks)
    return [ms.ExtractedTask(t.task_name, t.mod, t.target, list(t.dispatched), count)
            for t, count in zip(tasks, counts)]


def _calls_per_task(prepared: "tvm.IRModule", tasks: list[Any]) -> list[int]:
    """How often `main` calls a kernel of each task: the task's weight.

    MetaSchedule's own weights overcount with anchor-block matching (ResNet-18's layer-2 3x3
    convolution, called 3 times, weighed 4), which skews the scheduler and the estimate.
    """
    import tvm
    from tvm import relax, tirx
    from tvm.s_tir import meta_schedule as ms

    from hostkit.build.tuning.records import MODULE_EQUALITY

    calls: dict[str, int] = {}

    def visit(expr: Any) -> None:
        if isinstance(expr, relax.Call) and expr.args and isinstance(expr.args[0],
                                                                     tvm.ir.GlobalVar):
            calls[expr.args[0].name_hint] = calls.get(expr.args[0].name_hint, 0) + 1

    relax.analysis.post_order_visit(prepared["main"], visit)
    database = ms.database.MemoryDatabase(module_equality=MODULE_EQUALITY)
    kernels = [(database.commit_workload(tvm.IRModule({"main": f.with_attr("global_symbol",
                                                                            "main")})),
                calls.get(gv.name_hint, 0))
               for gv, f in prepared.functions.items() if isinstance(f, tirx.PrimFunc)]
    counts = []
    for task in tasks:
        workload = database.commit_workload(task.dispatched[0])
        count = sum(n for kernel, n in kernels if kernel.same_as(workload))
        counts.append(count or int(task.weight))  # no match: MetaSchedule's figure, not zero
    return counts


def _rpc_address(transport: Any) -> tuple[str, int] | None:
    """Where the device's daemon answers RPC, for transports that give a direct address."""
    tunnel = getattr(transport, "tunnel", None)
    if tunnel is not None:
        return "127.0.0.1", int(tunnel.port)
    if hasattr(transport, "host") and hasattr(transport, "port"):
        return str(transport.host), int(transport.port)
    return None


def make_runner(device: Device, transport: Any, kind: str = "llvm", boards: int = 1) -> Any:
    """MetaSchedule's RPC runner for the device; with a tracker, one worker per board.

    Each worker asks the tracker for a free daemon under the device's key for every candidate,
    so `boards` identical boards measure a batch's candidates `boards` at a time.
    """
    from tvm.s_tir import meta_schedule as ms

    evaluator = ms.runner.EvaluatorConfig(number=1, repeat=REPEATS, min_repeat_ms=MIN_REPEAT_MS,
                                          enable_cpu_cache_flush=False)
    address = _rpc_address(transport)
    if address is None:  # a tracker: MetaSchedule asks it for a daemon with the device's key
        host, _, port = (device.tracker or "").rpartition(":")
        config = ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port),
                                     tracker_key=device.key,
                                     session_timeout_sec=int(RUN_TIMEOUT_S))
        create = None
    else:
        config = ms.runner.RPCConfig(tracker_host=address[0], tracker_port=address[1],
                                     tracker_key="edgekit-direct",
                                     session_timeout_sec=int(RUN_TIMEOUT_S))
        create = functools.partial(connect_direct, kind)
    inner = ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator,
                                f_create_session=create,
                                max_workers=max(1, boards) if create is None else 1)
    return _serial_runner()(inner)


def connect_direct(kind: str, rpc_config: Any) -> Any:
    """MetaSchedule's session factory for a daemon at a known address (it only knows trackers).

    Runs in the runner's worker process; `tracker_host`/`tracker_port` carry the daemon's address.
    For an accelerator the daemon first loads TVM's runtime for it (a runtime-only TVM does not).
    """
    from tvm import rpc

    sess = rpc.connect(rpc_config.tracker_host, int(rpc_config.tracker_port),
                       session_timeout=rpc_config.session_timeout_sec)
    if kind == "cuda":
        sess.get_function("edgekit.use_device")(kind)
    return sess


@functools.lru_cache(maxsize=1)
def _serial_runner() -> Any:
    """A runner that finishes measuring a batch before the next batch is built.

    MetaSchedule otherwise builds the next task while the device times the last one; when the
    device is this machine (or shares its cores), that skews every measurement.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import PyRunner

    @derived_object
    class SerialRunner(PyRunner):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner
            self.measure_s = 0.0  # time spent waiting for the device(s): what more boards cut

        def run(self, runner_inputs: list[Any]) -> list[Any]:
            started = time.monotonic()
            futures = list(self.inner.run(runner_inputs))
            for future in futures:
                future.result()
            self.measure_s += time.monotonic() - started
            return futures

    return SerialRunner


def build_candidate(mod: "tvm.IRModule", target: "tvm.target.Target", _params: Any) -> Any:
    """MetaSchedule's default build without its import of every tensor intrinsic (see above)."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def export_candidate(export_dir: str, cross_compiler: str | None, cuda_arch: str | None,
                     mod: Any) -> str:
    """A shared library the device loads as is (so a board needs no compiler to be tuned).

    Each candidate gets its own folder: MetaSchedule deletes an artifact's whole folder once
    the artifact has been measured. A CUDA candidate carries a cubin for `cuda_arch`.
    """
    path = os.path.join(tempfile.mkdtemp(dir=export_dir), "candidate.so")
    extra: dict[str, Any] = {}
    if cuda_arch:
        from hostkit.build.cuda import pack_imports_compiled

        extra["fpack_imports"] = pack_imports_compiled(cuda_arch, "cubin")
    if cross_compiler:
        from tvm.support import cc

        mod.export_library(path, fcompile=cc.cross_compiler(cross_compiler), **extra)
    else:
        mod.export_library(path, **extra)
    return path


class _BudgetSpent(Exception):
    """Raised from the measure callback to end a tune whose time budget is spent."""


def _progress_callback(stats: TuneStats, budget_s: float | None, on_update: Any) -> Any:
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class Progress(PyMeasureCallback):
        def apply(self, task_scheduler: Any, task_id: int, measure_candidates: Any,
                  builder_results: Any, runner_results: Any) -> None:
            stats.record(task_id, list(builder_results), list(runner_results))
            on_update()
            if budget_s is not None and stats.elapsed() >= budget_s and not any(
                    index != task_id and task.measure_candidates is not None
                    for index, task in enumerate(task_scheduler.tasks_)):
                # Terminating tasks from here trips the scheduler's own checks (it may already
                # have picked one); ending the whole tune is safe once no other task's measured
                # batch awaits its join: this batch is in the database already (the default
                # callbacks run before this one).
                stats.budget_spent = True
                raise _BudgetSpent()

    return Progress()


def run_tuner(tasks: list[Any], target: "tvm.target.Target", work_dir: str, trials: int,
               trials_per_task: int | None, time_budget_min: float | None,
               cross_cc: str | None, runner: Any, console: "Console | None", device: str,
               cores: int) -> TuneStats:
    stats = TuneStats(names=[t.task_name for t in tasks], weights=[float(t.weight) for t in tasks])
    budget_s = time_budget_min * 60.0 if time_budget_min is not None else None
    even_share = max(TRIALS_PER_ITER, -(-trials // len(tasks)))
    # With a time budget the clock ends the tune: an even share per task would stop it early
    # (ResNet-18 at 5,000 trials stopped after 25 of 30 minutes with every task at its share),
    # so the gradient scheduler may give the slow kernels what the cheap ones do not need.
    per_task = trials_per_task or (trials if budget_s is not None else even_share)
    # A small budget is spread over the tasks instead of spent on the first one.
    per_iter = max(1, min(TRIALS_PER_ITER, per_task, -(-trials // len(tasks))))
    export_dir = tempfile.mkdtemp(prefix="edgekit-tune-")
    display = _Display(console, stats, trials, budget_s)
    try:
        with _metaschedule_logging():
            return _tune(tasks, target, work_dir, trials, per_task, per_iter, cross_cc, runner,
                         export_dir, stats, budget_s, display, cores)
    except TuneError:
        raise
    except Exception as exc:
        if stats.budget_spent:  # our own stop (it may come back wrapped by TVM's FFI)
            return stats
        raise TuneError(f"MetaSchedule failed: {_first_line(str(exc))}", device=device,
                        stage="tune") from exc
    finally:
        shutil.rmtree(export_dir, ignore_errors=True)


def _tune(tasks: list[Any], target: "tvm.target.Target", work_dir: str, trials: int,
          per_task: int, per_iter: int, cross_cc: str | None, runner: Any, export_dir: str,
          stats: TuneStats, budget_s: float | None, display: "_Display", cores: int) -> TuneStats:
    from tvm.s_tir import meta_schedule as ms

    from hostkit.build.tuning.records import MODULE_EQUALITY

    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        extracted_tasks=tasks, work_dir=work_dir, num_threads=cores,
        strategy=ms.search_strategy.EvolutionarySearch(population_size=POPULATION,
                                                       genetic_num_iters=GENERATIONS))
    arch = cuda_arch(target) if target.kind.name == "cuda" else None
    builder = ms.builder.LocalBuilder(
        max_workers=cores, timeout_sec=BUILD_TIMEOUT_S, f_build=build_candidate,
        f_export=functools.partial(export_candidate, export_dir, cross_cc, arch))
    callbacks = [*ms.measure_callback.MeasureCallback.create("default"),
                 _progress_callback(stats, budget_s, display.update)]
    # The builder's workers inherit the variable that keeps kernels as source until exported.
    with display, kernels_from_source() if arch else contextlib.nullcontext():
        ms.tune.tune_tasks(
            tasks=contexts, task_weights=weights, work_dir=work_dir,
            max_trials_global=trials, max_trials_per_task=per_task,
            num_trials_per_iter=per_iter, builder=builder,
            runner=runner, measure_callbacks=callbacks, task_scheduler="gradient",
            module_equality=MODULE_EQUALITY)
    return stats


@contextlib.contextmanager
def _metaschedule_logging() -> Iterator[None]:
    """MetaSchedule's logging, set up so that it works and stays quiet.

    Its console log (stdout) is kept to warnings unless -v was given; the full log still goes to
    `<records>/logs/`. The level is set before every tune because MetaSchedule derives its console
    handler's level from its logger's, then resets the latter. Handlers others attached to its
    logger are set aside meanwhile: MetaSchedule rebuilds the logger with `dictConfig` from the
    names of the handlers it finds, and an unnamed one (pytest's log capture attaches one to every
    non-propagating logger) failed the tune with "'NoneType' object has no attribute 'format'".
    """
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    verbose = logging.getLogger("edgekit").isEnabledFor(logging.DEBUG)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    foreign = [h for h in logger.handlers if not (h.get_name() or "").startswith(logger.name)]
    for handler in foreign:
        logger.removeHandler(handler)
    try:
        yield
    finally:
        for handler in foreign:
            logger.addHandler(handler)


class _Display:
    """A rich progress bar: trials done, valid ones, tasks measured, best estimate, time left."""

    def __init__(self, console: "Console | None", stats: TuneStats, trials: int,
                 budget_s: float | None) -> None:
        self.stats, self.trials, self.budget_s = stats, trials, budget_s
        self.progress: Any = None
        self.task_id: Any = None
        if console is not None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.progress = Progress(TextColumn("[bold]tuning[/bold]"), BarColumn(),
                                     MofNCompleteColumn(), TimeElapsedColumn(),
                                     TextColumn("{task.fields[detail]}"), console=console,
                                     transient=False)

    def __enter__(self) -> "_Display":
        if self.progress is not None:
            self.progress.start()
            self.task_id = self.progress.add_task("tune", total=self.trials,
                                                  detail=self._detail())
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.progress is not None:
            self.update()
            self.progress.stop()

    def _detail(self) -> str:
        s = self.stats
        estimate = s.estimate_ms()
        best = f"est. {estimate:.2f} ms" if estimate is not None else "est. -"
        left = ""
        if self.budget_s is not None:
            left = f" · {max(0.0, self.budget_s - s.elapsed()) / 60:.1f} min left"
        return (f"{s.valid} valid · tasks {len(s.best_s)}/{len(s.names)} measured · {best}{left}")

    def update(self) -> None:
        if self.progress is not None:
            self.progress.update(self.task_id, completed=min(self.stats.trials, self.trials),
                                 detail=self._detail())
