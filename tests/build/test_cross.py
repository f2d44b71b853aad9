"""Cross-compilation: AArch64 and armv7 libraries linked here, checked by their ELF headers."""

from __future__ import annotations

import shutil
import tarfile
from typing import Any

import pytest

from devicekit.info import elf_machine
from hostkit.build.compiler import build_artifact
from hostkit.build.targets import check_cross_compiler, resolve_target
from hostkit.cli import main
from hostkit.inventory import parse_inventory
from hostkit.models import ModelSpec, load_model

INVENTORY = {"devices": {
    "pi4": {"target": "raspberry-pi/4b-aarch64"},
    "pi3-32": {"target": {"kind": "llvm", "mtriple": "armv7l-linux-gnueabihf",
                          "mcpu": "cortex-a53", "mattr": ["+neon"]}},
    "pi4-tar": {"target": "raspberry-pi/4b-aarch64", "format": "tar"},
}}


def _build(name: str) -> Any:
    device = parse_inventory(INVENTORY).get(name)
    resolved = resolve_target(device)
    cc = check_cross_compiler(device, resolved)
    return build_artifact(load_model(ModelSpec("tinycnn")), resolved, fmt=device.format,
                          cross_compiler=cc, device=name)


@pytest.mark.skipif(not shutil.which("aarch64-linux-gnu-gcc"), reason="needs gcc-aarch64-linux-gnu")
def test_aarch64_so_is_an_aarch64_elf() -> None:
    artifact = _build("pi4")
    assert elf_machine(artifact.path.read_bytes()[:64]) == "aarch64"
    assert _build("pi4").cached, "the same model and target are not compiled twice"


@pytest.mark.skipif(not shutil.which("arm-linux-gnueabihf-gcc"),
                    reason="needs gcc-arm-linux-gnueabihf")
def test_armv7_so_is_an_arm_elf() -> None:
    artifact = _build("pi3-32")
    header = artifact.path.read_bytes()[:64]
    assert elf_machine(header) == "armv7l" and header[4] == 1, "32-bit ARM ELF"


def test_tar_format_needs_no_cross_compiler() -> None:
    artifact = _build("pi4-tar")
    with tarfile.open(artifact.path) as tar:
        objects = [m for m in tar.getmembers() if m.name.endswith(".o")]
        assert objects
        first = tar.extractfile(objects[0])
        assert first is not None and elf_machine(first.read(64)) == "aarch64"


@pytest.mark.integration
@pytest.mark.skipif(not shutil.which("aarch64-linux-gnu-gcc"), reason="needs gcc-aarch64-linux-gnu")
def test_wrong_architecture_artifact_is_refused_and_daemon_survives(
        daemon: Any, write_inventory: Any, capsys: pytest.CaptureFixture[str]) -> None:
    inv = write_inventory({"devices": {
        "liar": {"target": "raspberry-pi/4b-aarch64", "host": "127.0.0.1", "port": daemon.port},
        "dev": {"target": {"kind": "llvm"}, "host": "127.0.0.1", "port": daemon.port},
    }})
    assert main(["deploy", "-i", str(inv), "-d", "liar", "tinycnn", "--json"]) == 1
    out = capsys.readouterr().out
    assert '"stage": "load"' in out
    assert "is built for aarch64 but this device is x86_64" in out
    assert main(["deploy", "-i", str(inv), "-d", "dev", "tinycnn", "--json", "--repeat", "2"]) == 0
    assert '"status": "ok"' in capsys.readouterr().out
