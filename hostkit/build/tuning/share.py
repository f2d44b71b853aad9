"""Records shared between models: a tune starts each task from what other models already found.

Two models on one target often run the same kernels (ResNet-34 has ResNet-18's 3x3 convolutions).
Before a tune, every task of the model that its own records lack is looked up, by the same
anchor-block matching deploy uses, in the records of the other models on the same target, tuned
by the same TVM for the same exact target (`target.json`). Where found, that task's best records
are copied into this model's records: deploy applies them at once, and MetaSchedule's search is
seeded from them instead of starting blind (it seeds each round from the database's best and
never measures a schedule twice). The count of copied records is kept in `meta.json`, so resuming
a tune still counts only the trials this model spent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hostkit.build.tuning.records import (
    TARGET_FILE,
    VERSION_FILE,
    TuningRecords,
    open_database,
    target_text,
)

if TYPE_CHECKING:
    import tvm

__all__ = ["Borrowed", "borrow_records", "BORROW_TOP_K"]

# Records copied per shared task: enough to seed a search round (MetaSchedule seeds a fifth of
# its population of 256 from the database's best), few enough to keep the copy small.
BORROW_TOP_K = 32


@dataclass
class Borrowed:
    """What a tune took from other models' records."""

    tasks: int = 0
    records: int = 0
    sources: list[str] = field(default_factory=list)  # the models they came from


def _siblings(records: TuningRecords, target: "tvm.target.Target") -> list[TuningRecords]:
    """Other models' records on the same folder's target, same TVM, same exact tuned target."""
    import tvm

    parent = records.work_dir.parent
    if not parent.is_dir():
        return []
    wanted = target_text(target)
    found = []
    for path in sorted(parent.iterdir()):
        if path == records.work_dir or not path.name.endswith(f"-{records.preparation}"):
            continue
        other = TuningRecords(path)
        try:
            if (not other.exists()
                    or (path / VERSION_FILE).read_text(encoding="utf-8").strip() != tvm.__version__
                    or (path / TARGET_FILE).read_text(encoding="utf-8") != wanted):
                continue
        except OSError:
            continue
        found.append(other)
    return found


def borrow_records(records: TuningRecords, tasks: list[Any],
                   target: "tvm.target.Target") -> Borrowed:
    """Copy other models' best records of the tasks `records` lacks; says what was taken."""
    from tvm.s_tir import meta_schedule as ms

    borrowed = Borrowed()
    siblings = _siblings(records, target)
    if not siblings:
        return borrowed
    mine = open_database(records.work_dir)
    others: dict[Path, Any] = {}
    for task in tasks:
        mod = task.dispatched[0]
        if mine.has_workload(mod):
            continue
        for other in siblings:
            database = others.get(other.work_dir)
            if database is None:
                database = others[other.work_dir] = open_database(other.work_dir)
            if not database.has_workload(mod):
                continue
            # Anchor-block matching pairs kernels whose other blocks differ (fp32 MobileNetV2's
            # average pool and the int8 one's, named apart); MetaSchedule replays a seed's trace
            # as it is and stopped the whole tune on one it could not ("parallel_for_dynamic
            # error"), so only records that replay on this task are taken.
            top = [record for record in database.get_top_k(database.commit_workload(mod),
                                                           BORROW_TOP_K)
                   if _replays(record.trace, mod)]
            if not top:
                continue
            workload = mine.commit_workload(mod)
            for record in top:
                mine.commit_tuning_record(ms.database.TuningRecord(
                    record.trace, workload, record.run_secs, record.target, record.args_info))
            borrowed.tasks += 1
            borrowed.records += len(top)
            name = str(other.meta().get("model") or other.work_dir.name)
            if name not in borrowed.sources:
                borrowed.sources.append(name)
            break
    return borrowed


def _replays(trace: Any, mod: "tvm.IRModule") -> bool:
    """Whether a record's schedule applies to `mod` as MetaSchedule seeds from it."""
    from tvm import s_tir

    try:
        trace.apply_to_schedule(s_tir.Schedule(mod), remove_postproc=True)
    except Exception:  # a block or loop the trace names is not there
        return False
    return True
