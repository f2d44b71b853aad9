"""`edgekit export` on this machine: the bundle runs with no Python and matches PyTorch, its
manifest says what it holds, its archive is reproducible, and each bad input is one clear line.

The runner is run as a user would run it on a board: its own process with an empty environment,
so it can only find TVM's runtime through the bundle's rpath.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from devicekit.info import elf_machine
from hostkit.cli import main
from hostkit.errors import ExportError
from hostkit.export import export_bundle
from hostkit.export.runtime import runtime_for
from hostkit.inventory import Device
from hostkit.models import LoadedModel, ModelSpec, load_model, preprocessing_for
from hostkit.run.check import compare_outputs

LOCAL = {"devices": {"local": {"target": {"kind": "llvm"}, "managed": "local"}}}
# A bare environment: no PYTHONPATH, no LD_LIBRARY_PATH, no Python on PATH.
BARE_ENV = {"PATH": "/nonexistent"}


def _export(inventory: Path, out: Path, *extra: str, device: str = "local",
            model: str = "tinycnn") -> int:
    return main(["export", "-i", str(inventory), "--device", device, model, "-o", str(out),
                 *extra])


def _runner(bundle: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(bundle / "edgekit-runner"), *args], cwd=cwd, env=BARE_ENV,
                          capture_output=True, text=True, timeout=120, check=False)


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "edgekit:" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def local_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("bundle")
    inventory = base / "inventory.yaml"
    inventory.write_text(json.dumps(LOCAL), encoding="utf-8")
    assert _export(inventory, base / "dist" / "tinycnn-local") == 0
    return base / "dist" / "tinycnn-local"


@pytest.mark.integration
def test_local_bundle_runs_without_python_and_matches_pytorch(local_bundle: Path,
                                                              tmp_path: Path) -> None:
    done = _runner(local_bundle, str(local_bundle / "sample" / "input0.npy"), "--out",
                   str(tmp_path), "--repeat", "20", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    outputs = [np.load(tmp_path / "output0.npy")]
    reference = load_model(ModelSpec("tinycnn")).reference()
    check = compare_outputs(outputs, reference)
    assert check.passed(1e-4), check.reason(1e-4)
    stats = dict(kv.split("=") for kv in
                 next(ln for ln in done.stdout.splitlines() if ln.startswith("latency_ms"))
                 .split()[1:])
    assert stats["n"] == "20" and 0 < float(stats["p50"]) <= float(stats["p90"])


@pytest.mark.integration
def test_manifest_names_every_file_and_the_model(local_bundle: Path) -> None:
    manifest = json.loads((local_bundle / "manifest.json").read_text())
    files = sorted(str(p.relative_to(local_bundle)) for p in local_bundle.rglob("*")
                   if p.is_file() and p.name != "manifest.json")
    assert sorted(manifest["files"]) == files
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((local_bundle / name).read_bytes()).hexdigest() == digest, name
    assert {"model.so", "libtvm_runtime.so", "libtvm_ffi.so", "edgekit-runner", "runner.cc",
            "README.md", "inputs.txt"} <= set(files)
    model = manifest["model"]
    assert model["name"] == "tinycnn"
    assert model["inputs"] == [{"name": "input", "dtype": "float32", "shape": [1, 3, 32, 32]}]
    assert model["outputs"] == [{"name": "linear", "dtype": "float32", "shape": [1, 10]}]
    assert model["preprocessing"]["kind"] == "none"
    assert manifest["tvm"] == {"apache-tvm": "0.27.0.post1", "apache-tvm-ffi": "0.1.14.post1"}
    assert manifest["target"]["kind"] == "llvm" and manifest["arch"] == "x86_64"
    assert manifest["artifact_sha256"] == manifest["files"]["model.so"]
    assert manifest["tuned"] is False
    assert manifest["run"] in (local_bundle / "README.md").read_text()
    assert (local_bundle / "inputs.txt").read_text().splitlines()[1] == "input float32 1,3,32,32"
    runner = (local_bundle / "edgekit-runner")
    assert runner.stat().st_mode & stat.S_IXUSR
    assert elf_machine(runner.read_bytes()[:64]) == "x86_64"
    dynamic = subprocess.run(["readelf", "-d", str(runner)], capture_output=True, text=True).stdout
    assert "[$ORIGIN]" in dynamic and "libtvm_runtime.so" in dynamic


def test_torchvision_models_name_their_preprocessing() -> None:
    pre = preprocessing_for("resnet18")
    assert pre["kind"] == "torchvision-image-classification"
    assert pre["crop"] == [224] and pre["mean"] == [0.485, 0.456, 0.406] and pre["layout"] == "NCHW"


@pytest.mark.integration
@pytest.mark.parametrize(("make", "message"), [
    (lambda d: np.save(d / "x.npy", np.zeros((1, 3, 64, 64), np.float32)),
     "input 0 (input, x.npy) is 1x3x64x64 float32, but the model takes 1x3x32x32 float32"),
    (lambda d: np.save(d / "x.npy", np.zeros((1, 3, 32, 32), np.float64)),
     "input 0 (input, x.npy) is 1x3x32x32 float64, but the model takes 1x3x32x32 float32"),
    (lambda d: (d / "x.npy").write_bytes(b"\0" * 100),
     "input 0 (input, x.npy) holds 100 bytes of data, but 1x3x32x32 float32 needs 12288"),
])
def test_runner_refuses_an_input_it_cannot_feed(local_bundle: Path, tmp_path: Path, make: Any,
                                                message: str) -> None:
    make(tmp_path)
    done = _runner(local_bundle, "x.npy", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"edgekit-runner: error: {message}"]
    assert not (tmp_path / "output0.npy").exists()


@pytest.mark.integration
def test_runner_reads_raw_inputs_too(local_bundle: Path, tmp_path: Path) -> None:
    sample = local_bundle / "sample" / "input0.npy"
    np.load(sample).tofile(tmp_path / "input0.raw")
    for given, out in ((str(sample), "npy"), ("input0.raw", "raw")):
        (tmp_path / out).mkdir()
        done = _runner(local_bundle, given, "--out", out, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "raw" / "output0.npy"),
                                  np.load(tmp_path / "npy" / "output0.npy"))


@pytest.mark.integration
def test_runner_says_how_many_inputs_it_takes(local_bundle: Path, tmp_path: Path) -> None:
    done = _runner(local_bundle, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip() == ("edgekit-runner: error: the model takes 1 input file(s): "
                                   "input(1x3x32x32 float32); got 0")


@pytest.mark.integration
def test_archive_is_byte_for_byte_reproducible(tmp_path: Path) -> None:
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(json.dumps(LOCAL), encoding="utf-8")
    digests = []
    for attempt in ("one", "two"):
        assert _export(inventory, tmp_path / attempt / "tiny", "--archive") == 0
        archive = tmp_path / attempt / "tiny.tar.gz"
        assert sorted(os.listdir(tmp_path / attempt)) == ["tiny.tar.gz"]  # no folder, no temp
        digests.append(hashlib.sha256(archive.read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    with tarfile.open(tmp_path / "one" / "tiny.tar.gz") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names) and names[0] == "tiny" and "tiny/edgekit-runner" in names
    assert {(m.mtime, m.uid, m.gid, m.uname) for m in members} == {(0, 0, 0, "")}


# Bad input: one line naming the thing and what to do, exit 1, nothing written.

@pytest.mark.parametrize(("device", "needle"), [
    ("pi5", "unknown device 'pi5'"),
    ("gpu", "the runner runs models on the CPU, but gpu's target is cuda "
            "(export for a device with an llvm target)"),
    ("pi3", "pi3: apache-tvm publishes no wheel for arm, so edgekit has no TVM runtime to ship "
            "for it (build libtvm_runtime.so for that board from TVM's source, or export for an "
            "aarch64 or x86_64 device)"),
])
def test_devices_it_cannot_export_for(device: str, needle: str, write_inventory: Any,
                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inventory = write_inventory({"devices": {
        "pi4": {"target": {"kind": "llvm"}},
        "gpu": {"target": {"kind": "cuda", "arch": "sm_87", "host": {"kind": "llvm"}}},
        "pi3": {"target": {"kind": "llvm", "mtriple": "armv7l-linux-gnueabihf"}}}})
    assert _export(inventory, tmp_path / "out", device=device) == 1
    assert needle in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_missing_cross_compiler_is_one_line(write_inventory: Any, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    inventory = write_inventory({"devices": {"pi4": {
        "target": {"kind": "llvm", "mtriple": "aarch64-linux-gnu"},
        "cross_compiler": "aarch64-nowhere-linux-gnu-gcc"}}})
    assert _export(inventory, tmp_path / "out", device="pi4") == 1
    line = _one_error_line(capsys)
    assert line == ("edgekit: error: pi4: cross compiler aarch64-nowhere-linux-gnu-gcc for "
                    "aarch64-linux-gnu not found; install it with "
                    "`apt-get install gcc-aarch64-linux-gnu`")
    assert not (tmp_path / "out").exists()


def test_missing_cxx_cross_compiler_is_one_line(write_inventory: Any, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A C cross compiler without its g++: the runner cannot be built, said before compiling."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcc = bin_dir / "aarch64-only-gcc"
    gcc.write_text("#!/bin/sh\necho aarch64-linux-gnu\n")
    gcc.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    inventory = write_inventory({"devices": {"pi4": {
        "target": {"kind": "llvm", "mtriple": "aarch64-linux-gnu"},
        "cross_compiler": "aarch64-only-gcc"}}})
    assert _export(inventory, tmp_path / "out", device="pi4") == 1
    assert _one_error_line(capsys) == (
        "edgekit: error: pi4: C++ compiler aarch64-only-g++ for the runner (aarch64) not found; "
        "install it with `apt-get install g++-aarch64-linux-gnu`")


def test_a_model_the_runner_cannot_feed_is_refused_before_compiling(tmp_path: Path) -> None:
    model = LoadedModel(name="complexnet", program=None, identity="0" * 64,
                        inputs=[np.zeros((2, 2), np.complex64)])
    device = Device(name="local", target={"kind": "llvm"})
    with pytest.raises(ExportError, match="the runner cannot feed complexnet: input 0 is "
                                          "complex64, and it reads float32, "):
        export_bundle(device, model, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_no_runtime_for_an_architecture_without_wheels() -> None:
    with pytest.raises(ExportError, match="apache-tvm publishes no wheel for arm, so edgekit has "
                                          "no TVM runtime to ship for it"):
        runtime_for("arm", "pi3-32")


def test_existing_output_is_never_overwritten(write_inventory: Any, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    inventory = write_inventory(LOCAL)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert _export(inventory, full) == 1
    assert _one_error_line(capsys) == (f"edgekit: error: local: {full} already exists and is not "
                                       "empty (remove it or choose another -o)")
    assert os.listdir(full) == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["full",
                                                                              "inventory.yaml"]
    (tmp_path / "old.tar.gz").write_bytes(b"old")
    assert _export(inventory, tmp_path / "old", "--archive") == 1
    assert "old.tar.gz already exists (remove it or choose another -o)" in _one_error_line(capsys)
    assert (tmp_path / "old.tar.gz").read_bytes() == b"old"


def test_unwritable_output_path_is_one_line(write_inventory: Any, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    inventory = write_inventory(LOCAL)
    (tmp_path / "a-file").write_text("")
    assert _export(inventory, tmp_path / "a-file" / "bundle") == 1
    blocker = tmp_path / "a-file"
    assert _one_error_line(capsys) == (f"edgekit: error: local: cannot write the bundle under "
                                       f"{blocker}: {blocker} is a file (choose another -o)")
