"""Tuning records: MetaSchedule databases kept per target and model, applied by deploy and bench.

Records live under `<cache>/tuning/<target key>/<model key>/` as MetaSchedule's JSON database
(`database_workload.json`, `database_tuning_record.json`). Deploy applies them automatically when
they exist; the artifact cache key includes their fingerprint, so new records mean a new build.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hostkit.defaults import cache_dir
from hostkit.models import LoadedModel
from hostkit.targets import ResolvedTarget

if TYPE_CHECKING:
    import tvm

__all__ = ["TuningRecords", "records_for", "RECORD_FILES"]

RECORD_FILES = ("database_workload.json", "database_tuning_record.json")


@dataclass(frozen=True)
class TuningRecords:
    work_dir: Path

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
        for name in RECORD_FILES:
            path = self.work_dir / name
            if path.exists():
                digest.update(path.read_bytes())
        return f"{self.work_dir.parent.name}/{self.work_dir.name}@{digest.hexdigest()[:12]}"

    def compile(self, mod: "tvm.IRModule", target: "tvm.target.Target") -> tuple[Any, bool]:
        """Compile with the records applied; returns (executable, tuned)."""
        import tvm
        from tvm import relax

        pipeline = relax.pipeline.static_shape_tuning_pipeline(
            total_trials=0, target=target, work_dir=str(self.work_dir))
        with target:
            tuned_mod = pipeline(mod)
        return tvm.compile(tuned_mod, target), True


def _target_key(resolved: ResolvedTarget) -> str:
    text = json.dumps(resolved.to_json(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def records_for(model: LoadedModel, resolved: ResolvedTarget) -> TuningRecords:
    """Where the records of this model on this target live (they may not exist yet)."""
    return TuningRecords(cache_dir() / "tuning" / _target_key(resolved) / model.identity[:16])
