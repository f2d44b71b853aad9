"""The tuning pipeline: reach the device, prepare the model for its exact CPU, search, keep records.

The search itself (MetaSchedule, its runner and builder) lives in `hostkit.build.tuning.search`;
this module is the stage that connects it to a device, as `deploy` connects the build to one.
Before searching, tasks other models' records already cover are taken from them
(`hostkit.build.tuning.share`); a tracker device is measured on every board under its key at once.
After it, `meta.json` beside the records keeps the totals `edgekit records list` shows.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from hostkit.build.compiler import cores_kept, import_relax
from hostkit.build.targets import check_cross_compiler, complete_from_device, resolve_target
from hostkit.build.tuning.records import (
    PREPARATION,
    WINOGRAD,
    binds_run_time_sizes,
    device_target,
    prepare_module,
    records_for,
)
from hostkit.build.tuning.search import (
    TuneStats,
    describe_target,
    extract_tasks,
    kernel_profile,
    make_runner,
    run_tuner,
)
from hostkit.build.tuning.share import Borrowed, borrow_records
from hostkit.errors import TuneError
from hostkit.inventory import Device
from hostkit.models import ModelSpec, load_model
from hostkit.run.remote import DeviceSession, check_versions
from hostkit.transport import make_transport

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["tune_on_device"]


def tune_on_device(device: Device, spec: ModelSpec, *, trials: int, trials_per_task: int | None,
                   time_budget_min: float | None, console: "Console | None" = None,
                   winograd: bool = False) -> dict[str, Any]:
    """Tune `spec` on `device` and store the records deploy and bench apply; returns a summary.

    `winograd` tunes the Winograd preparation (its own records; see `records_for` for which
    records a build applies).
    """
    if trials < 1:
        raise TuneError("--trials must be at least 1", device=device.name, stage="tune")
    with cores_kept():
        return _tune(device, spec, trials, trials_per_task, time_budget_min, console, winograd)


def _tune(device: Device, spec: ModelSpec, trials: int, trials_per_task: int | None,
          time_budget_min: float | None, console: "Console | None",
          winograd: bool) -> dict[str, Any]:
    resolved = resolve_target(device)
    cross_cc = check_cross_compiler(device, resolved)
    model = load_model(spec)
    with make_transport(device) as transport:
        session = DeviceSession(transport, transport.session())
        info = session.info()
        check_versions(device.name, info)
        session.close()
        resolved = complete_from_device(device, resolved, info)
        records = records_for(model, resolved, WINOGRAD if winograd else PREPARATION)
        before = records.own_count()
        try:
            target = device_target(resolved, info)
        except TuneError as exc:
            exc.device = device.name
            raise
        if records.exists():
            target = records.tuned_target(target)
        imported = import_relax(model, target)
        if binds_run_time_sizes(imported):
            raise TuneError(f"{model.name} cannot be tuned yet: its post-processing has sizes "
                            "known only at run time (the boxes NMS keeps), which a tuned build "
                            "loses", device=device.name, stage="tune",
                            hint=f"`edgekit deploy {model.name}` builds it untuned")
        prepared = prepare_module(imported, target, records.preparation)
        tasks = extract_tasks(prepared, target, device.name)
        remaining = trials - before
        borrowed, boards, measure_s = Borrowed(), 1, 0.0
        if remaining <= 0:
            stats = TuneStats(names=[t.task_name for t in tasks],
                              weights=[float(t.weight) for t in tasks])
        else:
            records.save_target(target)
            borrowed = borrow_records(records, tasks, target)
            _note_borrowed(records, model.name, borrowed)
            if console is not None and borrowed.tasks:
                console.print(f"took {borrowed.tasks} of {len(tasks)} tasks from the records of "
                              f"{', '.join(borrowed.sources)}")
            boards = transport.boards()
            if console is not None and boards > 1:
                console.print(f"measuring on {boards} boards under key '{device.key}'")
            runner = make_runner(device, transport, resolved.kind, boards)
            stats = run_tuner(tasks, target, str(records.work_dir), remaining, trials_per_task,
                               time_budget_min, cross_cc, runner, console, device.name,
                               int(info.get("cores") or os.cpu_count() or 1))
            measure_s = float(runner.measure_s)
    valid_total = records.count()
    if valid_total == 0 or (remaining > 0 and stats.valid == 0):
        reason = f": {stats.first_error}" if remaining > 0 and stats.first_error else ""
        raise TuneError(f"tuning {model.name} measured no valid candidate in {stats.trials} "
                        f"trials ({stats.build_errors} failed to build, {stats.run_errors} failed "
                        f"to run){reason}", device=device.name, stage="tune",
                        hint="nothing was applied; run with -v for MetaSchedule's logs")
    kernels = kernel_profile(tasks, str(records.work_dir))
    untimed = [k for k in kernels if k["best_ms"] is None]
    estimate = None if untimed else sum(k["count"] * k["best_ms"] for k in kernels)
    meta = records.meta()
    records.write_meta({
        **meta, "model": model.name, "identity": model.identity,
        "trials": int(meta.get("trials", before)) + stats.trials,
        "minutes": round(float(meta.get("minutes") or 0.0) + stats.elapsed() / 60.0, 2),
        "estimated_ms": round(estimate, 3) if estimate is not None else None,
    })
    return {
        "model": model.name, "device": device.name, "target": describe_target(target),
        "preparation": records.preparation,
        "tasks": len(tasks), "trials": stats.trials, "valid_trials": stats.valid,
        "build_errors": stats.build_errors, "run_errors": stats.run_errors,
        "records_before": before, "records": valid_total,
        "estimated_ms": round(estimate, 3) if estimate is not None else None,
        "tune_s": round(stats.elapsed(), 1), "measure_s": round(measure_s, 1),
        "records_dir": str(records.work_dir),
        "kernels": kernels, "boards": boards, "borrowed_tasks": borrowed.tasks,
        "borrowed_records": borrowed.records, "borrowed_from": borrowed.sources,
    }


def _note_borrowed(records: Any, model: str, borrowed: Borrowed) -> None:
    """Count the copied records in meta.json, so a resumed tune counts only its own trials."""
    if not borrowed.records:
        return
    meta = records.meta()
    sources = [s for s in meta.get("borrowed_from", []) if s not in borrowed.sources]
    records.write_meta({**meta, "model": model,
                        "borrowed_records": int(meta.get("borrowed_records", 0)) + borrowed.records,
                        "borrowed_tasks": int(meta.get("borrowed_tasks", 0)) + borrowed.tasks,
                        "borrowed_from": sources + borrowed.sources})
