"""Unit tests of target resolution and the cross-compiler check (pure logic, no device)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostkit.build.targets import (
    arch_of_triple,
    check_cross_compiler,
    check_inventory_targets,
    resolve_target,
)
from hostkit.errors import InventoryError, TargetError
from hostkit.inventory import parse_inventory


def _device(target, **extra):  # type: ignore[no-untyped-def]
    return parse_inventory({"devices": {"d": {"target": target, **extra}}}).get("d")


@pytest.mark.parametrize(("triple", "arch"), [
    ("aarch64-linux-gnu", "aarch64"), ("armv7l-linux-gnueabihf", "arm"),
    ("arm-linux-gnueabihf", "arm"), ("x86_64-linux-gnu", "x86_64"), ("arm64", "aarch64"),
])
def test_arch_of_triple(triple: str, arch: str) -> None:
    assert arch_of_triple(triple) == arch


def test_resolve_tag_and_dict_targets() -> None:
    pi = resolve_target(_device("raspberry-pi/4b-aarch64"))
    assert pi.triple == "aarch64-linux-gnu" and pi.is_cross and pi.kind == "llvm"
    local = resolve_target(_device({"kind": "llvm"}))
    assert not local.is_cross


def test_bad_targets_are_one_line() -> None:
    with pytest.raises(TargetError) as err:
        resolve_target(_device("raspberry-pi/4b-aarch65"))
    assert str(err.value).startswith("d: unknown target tag 'raspberry-pi/4b-aarch65'; did you "
                                     "mean 'raspberry-pi/4b-aarch64'?")
    with pytest.raises(TargetError, match="old string form"):
        resolve_target(_device("llvm -mcpu=cortex-a72"))


def test_missing_cross_compiler_names_the_debian_package() -> None:
    device = _device("raspberry-pi/4b-aarch64", cross_compiler="no-such-aarch64-gcc")
    with pytest.raises(TargetError) as err:
        check_cross_compiler(device, resolve_target(device))
    assert "no-such-aarch64-gcc for aarch64-linux-gnu not found" in str(err.value)
    assert "apt-get install gcc-aarch64-linux-gnu" in str(err.value)
    # the host compiler builds for x86_64, not for the board
    wrong = _device("raspberry-pi/4b-aarch64", cross_compiler="gcc")
    with pytest.raises(TargetError, match="gcc builds for x86_64.*but the target is aarch64"):
        check_cross_compiler(wrong, resolve_target(wrong))
    tar = _device("raspberry-pi/4b-aarch64", cross_compiler="no-such-gcc", format="tar")
    assert check_cross_compiler(tar, resolve_target(tar)) is None


def test_inventory_targets_checked_once_then_answered_from_the_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hostkit.build import targets

    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path))
    inventory = parse_inventory({"groups": {"arm": {"target": "raspberry-pi/9"}},
                                 "devices": {"a": {"target": {"kind": "llvm"}},
                                             "b": {"target": {"kind": "llvm"}, "groups": ["arm"]},
                                             "c": {"groups": ["arm"]}}})
    with pytest.raises(InventoryError) as err:
        check_inventory_targets(inventory)
    assert str(err.value).startswith("inventory: groups.arm.target: unknown target tag "
                                     "'raspberry-pi/9'; did you mean 'raspberry-pi/4b-aarch64'?")

    def no_tvm(specs: list, where: str) -> list:
        raise AssertionError(f"TVM asked again about {specs}")

    monkeypatch.setattr(targets, "_ask_tvm", no_tvm)
    with pytest.raises(InventoryError, match="groups.arm.target: unknown target tag"):
        check_inventory_targets(inventory)
    check_inventory_targets(parse_inventory({"devices": {"a": {"target": {"kind": "llvm"}}}}))
    # A damaged cache file is asked again, not trusted.
    (tmp_path / "targets.json").write_text('{"tvm": 1, "verdicts": [')
    monkeypatch.setattr(targets, "_ask_tvm", lambda specs, where: ["refused"] * len(specs))
    with pytest.raises(InventoryError, match="devices.a.target: refused"):
        check_inventory_targets(parse_inventory({"devices": {"a": {"target": {"kind": "llvm"}}}}))
    assert not list(tmp_path.glob(".targets.*")), "no temporary file left behind"
