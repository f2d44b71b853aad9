"""Unit tests of target resolution and the cross-compiler check (pure logic, no device)."""

from __future__ import annotations

import pytest

from hostkit.build.targets import arch_of_triple, check_cross_compiler, resolve_target
from hostkit.errors import TargetError
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
