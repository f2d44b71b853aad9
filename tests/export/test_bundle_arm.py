"""`edgekit export` for the emulated Raspberry Pi 4: the aarch64 bundle runs with no Python.

The bundle is cross-built here (model, runner) with the aarch64 runtime from TVM's wheels, then run
under qemu in a bare root filesystem that holds only the bundle and the C libraries it links,
taken from the board's image (see `bare_rootfs`); its outputs are compared with PyTorch's. That
needs the image, not a booted board. `deploy --runtime cpp` then runs it on the booted board, in
its own root filesystem and namespace, beside the daemon.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from bare_rootfs import make_bare_rootfs, run_in_bare_rootfs

from devicekit.info import elf_machine
from hostkit.boards.image import IMAGES_ENV, ensure_image, host_problems, images_dir
from hostkit.cli import main
from hostkit.models import ModelSpec, load_model
from hostkit.run.check import Check, compare_outputs

pytestmark = pytest.mark.integration

BOARD = "emu-test"
PI4 = {"target": "raspberry-pi/4b-aarch64"}
# The user's board images, read before the session's EDGEKIT_CACHE hides them (as conftest does).
USER_BOARD_IMAGES = images_dir()


@pytest.fixture(scope="module")
def board_image() -> Iterator[Path]:
    """The emulated board's root filesystem (built once per machine), not booted."""
    problems = host_problems()
    if problems:
        pytest.skip(problems[0])
    old = os.environ.get(IMAGES_ENV)
    os.environ[IMAGES_ENV] = old or str(USER_BOARD_IMAGES)
    yield ensure_image(lambda line: print(line))
    if old is None:
        os.environ.pop(IMAGES_ENV, None)


def _export_and_run_bare(board_image: Path, model: str, tmp_path: Path,
                         write_inventory: Any) -> tuple[Path, Check, str]:
    inventory = write_inventory({"devices": {"pi4": PI4}})
    bundle = tmp_path / f"{model}-pi4"
    assert main(["export", "-i", str(inventory), "--device", "pi4", model, "-o", str(bundle)]) == 0
    root = tmp_path / "bare"
    libs = make_bare_rootfs(board_image, bundle, root)
    assert "libstdc++.so.6" in libs
    assert not [p for p in root.rglob("*") if "python" in p.name.lower()]
    done = run_in_bare_rootfs(root, ["/bundle/edgekit-runner", "/bundle/sample/input0.npy",
                                     "--out", "/out", "--repeat", "3"])
    assert done.returncode == 0, done.stderr
    check = compare_outputs([np.load(root / "out" / "output0.npy")],
                            load_model(ModelSpec(model)).reference())
    assert check.passed(1e-4), check.reason(1e-4)
    return bundle, check, done.stdout


def test_aarch64_bundle_runs_without_python(board_image: Path, tmp_path: Path,
                                            write_inventory: Any) -> None:
    bundle, check, stdout = _export_and_run_bare(board_image, "tinycnn", tmp_path,
                                                 write_inventory)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["arch"] == "aarch64" and manifest["target"]["mtriple"] == "aarch64-linux-gnu"
    assert "manylinux_2_28_aarch64" in manifest["runtime"]["from"]
    assert manifest["runner"]["compiler"] == "aarch64-linux-gnu-g++"
    for name in ("edgekit-runner", "model.so", "libtvm_runtime.so", "libtvm_ffi.so"):
        assert elf_machine((bundle / name).read_bytes()[:64]) == "aarch64", name
    assert "latency_ms n=3" in stdout
    print(f"tinycnn, aarch64 bundle in a bare rootfs: relative error {check.rel_err:.2e}; "
          + stdout.splitlines()[-1])


@pytest.mark.slow
def test_resnet18_bundle_runs_without_python(board_image: Path, tmp_path: Path,
                                             write_inventory: Any) -> None:
    _bundle, check, stdout = _export_and_run_bare(board_image, "resnet18", tmp_path,
                                                  write_inventory)
    assert check.top1_match and check.top5_match
    print(f"resnet18, aarch64 bundle in a bare rootfs: relative error {check.rel_err:.2e}; "
          + stdout.splitlines()[-1])


def test_deploy_runtime_cpp_on_the_board(emulated_board: Any, write_inventory: Any,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """The runner in the booted board's root filesystem and namespace, PATH holding only the
    bundle, checked against PyTorch and timed beside the daemon."""
    inventory = write_inventory({"devices": {emulated_board.name: {
        **PI4, "host": emulated_board.host, "port": emulated_board.port,
        "managed": "qemu-arm64", "session_timeout": 900}}})
    code = main(["deploy", "-i", str(inventory), "--device", BOARD, "tinycnn", "--runtime",
                 "cpp", "--repeat", "5", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["status"] == "ok", result["error"]
    cpp = result["cpp"]
    assert cpp["rel_err"] < 1e-4 and cpp["latency_ms"]["n"] == 5 and result["emulated"] is True
    print(f"tinycnn on the emulated board: daemon p50 {result['latency_ms']['p50']:.2f} ms, "
          f"C++ runner p50 {cpp['latency_ms']['p50']:.2f} ms, relative error "
          f"{cpp['rel_err']:.2e} (daemon {result['rel_err']:.2e})")
