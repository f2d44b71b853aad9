"""Tuning records another TVM wrote are refused in one line, not applied or crashed on."""

from __future__ import annotations

import pytest

from hostkit.build.compiler import build_artifact
from hostkit.build.targets import resolve_target
from hostkit.build.tuning.records import RECORD_FILES, VERSION_FILE, records_for
from hostkit.errors import TuneError
from hostkit.inventory import parse_inventory
from hostkit.models import ModelSpec, load_model


def test_records_from_another_tvm_version_are_refused() -> None:
    device = parse_inventory({"devices": {"d": {"target": {"kind": "llvm"}}}}).get("d")
    resolved = resolve_target(device)
    model = load_model(ModelSpec("tinycnn", input_shape=(1, 3, 12, 12), seed=11))
    records = records_for(model, resolved)
    records.work_dir.mkdir(parents=True)
    (records.work_dir / RECORD_FILES[1]).write_text('["not", "a", "record"]\n', encoding="utf-8")
    (records.work_dir / VERSION_FILE).write_text("0.19.0", encoding="utf-8")
    with pytest.raises(TuneError) as err:
        build_artifact(model, resolved, tuning=records, device="d")
    assert str(err.value).startswith(f"tuning records in {records.work_dir} were made with TVM "
                                     "0.19.0; this is TVM 0.27")
    assert "--no-tuning" in str(err.value)
