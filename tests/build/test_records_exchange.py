"""Records that travel (`edgekit records export|import|list`) and records shared between models.

The refusals run on hand-made records (no tuning); the round trip and the cross-model reuse tune
tinycnn once, for real, against the session's daemon.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Iterator

import pytest

from hostkit.cli import main

SHAPE = "1,3,16,16"


def _console() -> Any:
    from rich.console import Console

    return Console(file=io.StringIO(), width=100, color_system=None)


def _fake_records(shape: tuple[int, ...]) -> Path:
    """Records for tinycnn on a plain llvm device, written by hand (their contents are not read
    before the checks that refuse them)."""
    import tvm

    from hostkit.build.targets import resolve_target
    from hostkit.build.tuning.records import RECORD_FILES, records_for
    from hostkit.inventory import parse_inventory
    from hostkit.models import ModelSpec, load_model

    device = parse_inventory({"devices": {"d": {"target": {"kind": "llvm"}}}}).get("d")
    records = records_for(load_model(ModelSpec("tinycnn", input_shape=shape)),
                          resolve_target(device))
    records.save_target(tvm.target.Target({"kind": "llvm", "num-cores": 2}))
    for name in RECORD_FILES:
        (records.work_dir / name).write_text('["not", "a", "record"]\n', encoding="utf-8")
    return records.work_dir


def test_import_refuses_another_target_or_tvm_in_one_line(
        write_inventory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "exporter"))
    inv = write_inventory({"devices": {
        "d": {"target": {"kind": "llvm"}},
        "arm": {"target": {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}}}})
    _fake_records((1, 3, 12, 12))
    exported = tmp_path / "tiny.records.json"
    assert main(["records", "export", "-i", str(inv), "--device", "d", "tinycnn",
                 "--input-shape", "1,3,12,12", "-o", str(exported)]) == 0
    capsys.readouterr()

    importer = tmp_path / "importer"
    monkeypatch.setenv("EDGEKIT_CACHE", str(importer))

    def refused(*argv: str) -> str:
        assert main(["records", "import", *argv]) == 1
        captured = capsys.readouterr()
        assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
        assert not (importer / "tuning").exists() or not any((importer / "tuning").rglob("*.json"))
        return captured.err.strip()

    line = refused(str(exported), "-i", str(inv), "--device", "arm")
    assert line.startswith(f"edgekit: error: arm: records in {exported} are for target 'llvm")
    assert "device 'arm' has target 'llvm mtriple=aarch64-linux-gnu'" in line

    document = json.loads(exported.read_text())
    document["tvm_version"] = "0.19.0"
    other_tvm = tmp_path / "other-tvm.json"
    other_tvm.write_text(json.dumps(document))
    line = refused(str(other_tvm))
    assert f"records in {other_tvm} were made with TVM 0.19.0; this is TVM 0.27" in line

    damaged = tmp_path / "damaged.json"
    damaged.write_text(exported.read_text()[:200])
    assert "is not an edgekit records file" in refused(str(damaged))

    # The same file for a device with its target is taken, byte for byte.
    assert main(["records", "import", str(exported), "-i", str(inv), "--device", "d"]) == 0
    (row,) = json.loads(_run_json(capsys, ["records", "list", "--json"]))
    assert row["model"] == "tinycnn" and row["target"].endswith("num-cores=2")
    for name in ("database_workload.json", "database_tuning_record.json", "target.json"):
        assert (Path(row["path"]) / name).read_bytes() == \
            (tmp_path / "exporter" / Path(row["path"]).relative_to(importer) / name).read_bytes()


def _run_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 0
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def tuned_tiny(daemon: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """tinycnn tuned on the session's daemon, in a cache of this module's own."""
    import yaml

    from hostkit.inventory import load_inventory
    from hostkit.models import ModelSpec
    from hostkit.run.tune import tune_on_device

    root = tmp_path_factory.mktemp("records-exchange")
    inv = root / "inventory.yaml"
    inv.write_text(yaml.safe_dump({"devices": {"local": {
        "target": {"kind": "llvm"}, "host": "127.0.0.1", "port": daemon.port}}}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGEKIT_CACHE", str(root / "cache"))
        summary = tune_on_device(load_inventory(inv).get("local"),
                                 ModelSpec("tinycnn", input_shape=(1, 3, 16, 16)), trials=6,
                                 trials_per_task=1, time_budget_min=None, console=None)
    yield {"root": root, "inventory": inv, "cache": root / "cache", "summary": summary}


@pytest.mark.integration
@pytest.mark.slow
def test_export_import_round_trip_builds_the_same_artifact(
        tuned_tiny: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    inv = str(tuned_tiny["inventory"])
    deploy = ["deploy", "-i", inv, "--device", "local", "tinycnn", "--input-shape", SHAPE,
              "--json"]
    monkeypatch.setenv("EDGEKIT_CACHE", str(tuned_tiny["cache"]))
    first = json.loads(_run_json(capsys, deploy))
    assert first["status"] == "ok" and first["tuned"] is True
    exported = tmp_path / "tinycnn.records.json"
    assert main(["records", "export", "-i", inv, "--device", "local", "tinycnn",
                 "--input-shape", SHAPE, "-o", str(exported)]) == 0

    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "second-cache"))
    assert main(["records", "import", str(exported), "-i", inv, "--device", "local"]) == 0
    (row,) = json.loads(_run_json(capsys, ["records", "list", "--json"]))
    assert row["model"] == "tinycnn" and row["trials"] == tuned_tiny["summary"]["trials"]
    assert row["minutes"] > 0
    second = json.loads(_run_json(capsys, deploy))
    assert second["status"] == "ok" and second["tuned"] is True
    assert second["records"] == first["records"]
    assert second["artifact_sha256"] == first["artifact_sha256"]


def _pair(folder: Path) -> tuple[Path, Path]:
    """Two models that share their first convolution (3->8, 3x3, same input) and nothing else.
    Eight output channels: a convolution whose channels a vector divides runs on edgekit's
    hand-scheduled direct kernel, which no tune measures."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    first = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    second = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                           nn.Conv2d(8, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                           nn.Linear(4, 4)).eval()
    paths = folder / "first.pt2", folder / "second.pt2"
    for model, path in zip((first, second), paths):
        torch.export.save(torch.export.export(model, (torch.randn(1, 3, 16, 16),)), str(path))
    return paths


def _shared_best(work_dir: Path, other: Path) -> list[tuple[bool, float, float]]:
    """Per kernel both records have (`other` with a valid time): (is it a convolution, best time
    here, best time in other)."""
    import tvm_ffi

    from hostkit.build.tuning.records import open_database

    mine, theirs = open_database(work_dir), open_database(other)
    best: dict[int, list[Any]] = {}
    for record in mine.get_all_tuning_records():
        mod = record.workload.mod
        if not record.run_secs or not theirs.has_workload(mod):
            continue
        top = theirs.get_top_k(theirs.commit_workload(mod), 1)
        if not top:
            continue
        here = sum(float(s) for s in record.run_secs) / len(record.run_secs)
        there = sum(float(s) for s in top[0].run_secs) / len(top[0].run_secs)
        key = tvm_ffi.structural_hash(mod)
        row = best.setdefault(key, ["conv2d" in mod.script(), here, there])
        row[1] = min(row[1], here)
    return [tuple(row) for row in best.values()]  # type: ignore[misc]


@pytest.mark.integration
@pytest.mark.slow
def test_a_tune_takes_shared_tasks_from_other_models(tuned_tiny: dict[str, Any], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from hostkit.inventory import load_inventory
    from hostkit.models import ModelSpec
    from hostkit.run.tune import tune_on_device

    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache"))
    first, second = _pair(tmp_path)
    device = load_inventory(tuned_tiny["inventory"]).get("local")
    mine = tune_on_device(device, ModelSpec(str(first)), trials=8, trials_per_task=1,
                          time_budget_min=None, console=None)
    console = _console()
    summary = tune_on_device(device, ModelSpec(str(second)), trials=2, trials_per_task=1,
                             time_budget_min=None, console=console)
    # The first convolution and the input's layout transpose are the first model's too; the
    # rest is not.
    borrowed = summary["borrowed_tasks"]
    assert borrowed >= 1 and summary["borrowed_from"] == ["first.pt2"]
    assert f"took {borrowed} of {summary['tasks']} tasks from the records of first.pt2" in \
        console.file.getvalue()
    shared = _shared_best(Path(summary["records_dir"]), Path(mine["records_dir"]))
    assert len(shared) == borrowed and any(conv for conv, _, _ in shared)
    # the first model's best of each is the second's too, before (and whatever) its own
    # trials found.
    assert all(here <= there for _, here, there in shared)
    meta = json.loads((Path(summary["records_dir"]) / "meta.json").read_text())
    assert meta["borrowed_records"] == summary["borrowed_records"] >= 1
    assert meta["model"] == "second.pt2" and meta["trials"] == summary["trials"]


def _pooled(name: str) -> Any:
    """A global average pool whose reduction block is called `name`."""
    import tvm
    from tvm import te

    x = te.placeholder((1, 7, 7, 64), "float32", name="x")
    k1, k2 = te.reduce_axis((0, 7)), te.reduce_axis((0, 7))
    red = te.compute((1, 64), lambda b, c: te.sum(x[b, k1, k2, c], axis=[k1, k2]), name=name)
    out = te.compute((1, 64), lambda b, c: red[b, c] / 49.0, name=f"{name}_mean")
    return tvm.IRModule({"main": te.create_prim_func([x, out])})


def _parallel_trace(mod: Any, block: str) -> Any:
    from tvm import s_tir

    sch = s_tir.Schedule(mod)
    sch.parallel(sch.get_loops(sch.get_sblock(block))[1])
    return sch.trace


def test_a_borrowed_record_must_replay_on_the_task() -> None:
    """Anchor-block matching pairs kernels whose blocks are named apart (fp32 and int8
    MobileNetV2's average pools); a seed whose trace names a block the task lacks stopped the
    whole tune, so such records are not borrowed."""
    from hostkit.build.tuning.share import _replays

    mine, theirs = _pooled("a_red"), _pooled("b_red")
    trace = _parallel_trace(theirs, "b_red")
    assert _replays(trace, theirs)
    assert not _replays(trace, mine)


def test_records_that_do_not_replay_are_one_clear_error(tmp_path: Path) -> None:
    """A database holding such a record (written by the tune that then stopped) fails to load
    inside MetaSchedule; the user gets the folder and what to do, not a C++ traceback."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from hostkit.build.tuning.records import open_database
    from hostkit.errors import TuneError

    mine = _pooled("a_red")
    database = open_database(tmp_path)
    workload = database.commit_workload(mine)
    target = tvm.target.Target({"kind": "llvm"})
    database.commit_tuning_record(ms.database.TuningRecord(
        _parallel_trace(_pooled("b_red"), "b_red"), workload, [1e-3], target,
        ms.arg_info.ArgInfo.from_prim_func(mine["main"])))
    with pytest.raises(TuneError) as error:
        open_database(tmp_path)
    assert f"the tuning records in {tmp_path} cannot be read" in str(error.value)
    assert f"remove {tmp_path} and tune again" in error.value.hint
