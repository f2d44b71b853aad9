"""Records that travel: one tune serves a fleet of identical boards, on any host.

`export_records` writes one JSON file holding a model's records on a target exactly as the cache
keeps them (MetaSchedule's two database files, `target.json`, the TVM version), with what they are
for: the model, the inventory target they are filed under, the exact tuned target, the TVM version
and the Relax preparation. `import_records` checks all of that before it writes anything, and
refuses in one line naming what differs: records tuned by another TVM or for another preparation
would not match the kernels this edgekit builds, and records for another target would be applied to
a CPU they were never measured on. Imported files are byte for byte the exported ones, so a deploy
on the importing host builds the very artifact the exporting host built (same hash).
An import into records that already exist adds the imported records to them (MetaSchedule keeps the
best per kernel); the merged result replaces the old folder in one rename.

`list_records` is what `edgekit records list` shows: every model's records in the cache.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hostkit.build.targets import ResolvedTarget
from hostkit.build.tuning.records import (
    META_FILE,
    PREPARATIONS,
    RECORD_FILES,
    TARGET_FILE,
    VERSION_FILE,
    TuningRecords,
    open_database,
    records_dir_name,
    target_key,
    tuning_root,
)
from hostkit.errors import TuneError

__all__ = ["FORMAT", "export_records", "import_records", "list_records", "MAX_FILE_BYTES"]

FORMAT = "edgekit-tuning-records/1"
# A ResNet-50 tune of 20,000 trials writes about 60 MB; anything far larger is not a records file.
MAX_FILE_BYTES = 512 * 1024 * 1024


def export_records(records: TuningRecords, model_name: str, identity: str,
                   resolved: ResolvedTarget, output: Path, device: str) -> dict[str, Any]:
    """Write `records` to `output` (atomically); returns what the file says about them."""
    if not records.exists():
        raise TuneError(f"no tuning records for {model_name} on this target", device=device,
                        stage="records",
                        hint=f"tune first: `edgekit tune --device {device} {model_name}`")
    files = {}
    for name in (*RECORD_FILES, TARGET_FILE, VERSION_FILE):
        path = records.work_dir / name
        if not path.exists():
            raise TuneError(f"the records in {records.work_dir} lack {name}; tune again to "
                            "complete them", device=device, stage="records")
        files[name] = path.read_text(encoding="utf-8")
    meta = records.meta()
    document = {
        "format": FORMAT, "model": model_name, "identity": identity,
        "preparation": records.preparation, "tvm_version": files[VERSION_FILE].strip(),
        "inventory_target": resolved.to_json(), "target_key": target_key(resolved),
        "target": json.loads(files[TARGET_FILE]), "meta": meta, "files": files,
    }
    if output.is_dir():
        raise TuneError(f"{output} is a folder; name the records file to write", device=device,
                        stage="records")
    tmp = None
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", dir=output.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(document, handle)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep the file from the fleet's other users
        os.replace(tmp, output)
    except OSError as exc:
        raise TuneError(f"cannot write {output}: {exc.strerror or exc}", device=device,
                        stage="records") from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return _summary(document, records.count(), output)


def _summary(document: dict[str, Any], count: int, path: Path) -> dict[str, Any]:
    meta = document.get("meta") or {}
    return {"model": document["model"], "target": _describe(document["target"]),
            "records": count, "trials": meta.get("trials"), "minutes": meta.get("minutes"),
            "best_ms": meta.get("estimated_ms"), "path": str(path)}


def _describe(target: dict[str, Any]) -> str:
    parts = [str(target.get("kind", "?"))]
    for key in ("mtriple", "mcpu", "num-cores"):
        if target.get(key):
            parts.append(f"{key}={target[key]}")
    return " ".join(parts)


def _read(path: Path) -> dict[str, Any]:
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise TuneError(f"{path} is {size / 1e6:.0f} MB, larger than any records file",
                            stage="records")
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TuneError(f"cannot read {path}: {exc.strerror or exc}", stage="records") from exc
    except ValueError as exc:
        raise TuneError(f"{path} is not an edgekit records file (not JSON: {exc})",
                        stage="records",
                        hint="make one with `edgekit records export`") from exc
    files = document.get("files") if isinstance(document, dict) else None
    if (not isinstance(document, dict) or document.get("format") != FORMAT
            or not isinstance(files, dict)
            or not all(isinstance(files.get(n), str)
                       for n in (*RECORD_FILES, TARGET_FILE, VERSION_FILE))
            or not isinstance(document.get("identity"), str)
            or not isinstance(document.get("target_key"), str)
            or not isinstance(document.get("target"), dict)):
        raise TuneError(f"{path} is not an edgekit records file ({FORMAT})", stage="records",
                        hint="make one with `edgekit records export`")
    return document


def import_records(path: Path, resolved: ResolvedTarget | None = None,
                   device: str | None = None) -> dict[str, Any]:
    """Check `path` and add its records to the cache; with `resolved`, for that device's target.

    Nothing is written unless every check passes, and what is written appears in one rename.
    """
    import tvm

    document = _read(path)
    theirs = str(document.get("tvm_version", "?"))[:40]
    if theirs != tvm.__version__:
        raise TuneError(f"records in {path} were made with TVM {theirs}; this is TVM "
                        f"{tvm.__version__}", device=device, stage="records",
                        hint="tune here instead, or export them from a host with this TVM")
    preparation = document.get("preparation")
    if preparation not in PREPARATIONS:
        raise TuneError(f"records in {path} are for edgekit's model preparation "
                        f"'{str(preparation)[:40]}'; this edgekit prepares "
                        f"{' or '.join(repr(p) for p in PREPARATIONS)}", device=device,
                        stage="records",
                        hint="tune here instead; they would not match this build's kernels")
    _check_target(document, path)
    if resolved is not None and target_key(resolved) != document["target_key"]:
        inventory = document.get("inventory_target")
        filed = _describe(inventory) if isinstance(inventory, dict) else document["target_key"]
        raise TuneError(f"records in {path} are for target '{filed}'; device '{device}' has "
                        f"target '{_describe(resolved.to_json())}'", device=device,
                        stage="records", hint="import them for a device with the same target")
    key = str(document["target_key"])
    if not key.isalnum() or not str(document["identity"]).isalnum():
        raise TuneError(f"{path} is not an edgekit records file (bad target key or identity)",
                        stage="records")
    destination = tuning_root() / key / records_dir_name(str(document["identity"]),
                                                          str(preparation))
    records = _install(document, destination, path)
    meta = records.meta()
    return {**_summary(document, records.count(), destination),
            "trials": meta.get("trials"), "minutes": meta.get("minutes"),
            "best_ms": meta.get("estimated_ms")}


def _check_target(document: dict[str, Any], path: Path) -> None:
    """The tuned target must be one this TVM accepts and equal the one the records name."""
    import tvm

    try:
        tvm.target.Target(json.loads(document["files"][TARGET_FILE]))
    except Exception as exc:
        raise TuneError(f"records in {path} name a target this TVM rejects: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                        stage="records") from exc
    if json.loads(document["files"][TARGET_FILE]) != document["target"]:
        raise TuneError(f"records in {path} are inconsistent: their target.json differs from "
                        "the target they name", stage="records",
                        hint="export them again with `edgekit records export`")


def _install(document: dict[str, Any], destination: Path, path: Path) -> TuningRecords:
    files: dict[str, str] = document["files"]
    existing = TuningRecords(destination)
    if existing.exists():
        here = (destination / TARGET_FILE).read_text(encoding="utf-8") \
            if (destination / TARGET_FILE).exists() else None
        if here is not None and json.loads(here) != document["target"]:
            raise TuneError(f"records in {path} were tuned for '{_describe(document['target'])}'"
                            f" but those in {destination} for '{_describe(json.loads(here))}'",
                            stage="records",
                            hint=f"remove {destination} first to replace them")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        for name, text in files.items():
            if name in (*RECORD_FILES, TARGET_FILE, VERSION_FILE):
                (staging / name).write_text(text, encoding="utf-8")
        meta = dict(document.get("meta") or {})
        meta.setdefault("model", document.get("model"))
        if existing.exists():
            _merge(existing.work_dir, staging)
            meta = {**existing.meta(), **meta}
        (staging / META_FILE).write_text(json.dumps(meta, sort_keys=True, indent=2),
                                         encoding="utf-8")
        _swap(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return TuningRecords(destination)


def _merge(existing: Path, staging: Path) -> None:
    """Add the records already in `existing` to the imported ones in `staging`."""
    source = open_database(existing)
    target = open_database(staging)
    for record in source.get_all_tuning_records():
        workload = target.commit_workload(record.workload.mod)
        target.commit_tuning_record(type(record)(record.trace, workload, record.run_secs,
                                                 record.target, record.args_info))


def _swap(staging: Path, destination: Path) -> None:
    old = None
    if destination.exists():
        old = destination.with_name(f".{destination.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        destination.rename(old)
    staging.rename(destination)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def list_records() -> list[dict[str, Any]]:
    """Every model's records in the cache: model, target, trials, minutes, best latency."""
    root = tuning_root()
    rows = []
    for path in sorted(root.glob("*/*")):
        records = TuningRecords(path)
        if not path.is_dir() or path.name.startswith(".") or not records.exists():
            continue
        meta = records.meta()
        try:
            target: Any = json.loads((path / TARGET_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            target = None
        rows.append({
            "model": meta.get("model") or path.name,
            "target": _describe(target) if isinstance(target, dict) else "?",
            "trials": meta.get("trials", records.own_count()),
            "minutes": meta.get("minutes"), "best_ms": meta.get("estimated_ms"),
            "records": records.count(), "borrowed_tasks": meta.get("borrowed_tasks", 0),
            "preparation": records.preparation, "path": str(path),
        })
    return rows

