"""Golden tests: inventory data -> devices, and bad inventories -> their exact one-line errors."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from hostkit.errors import InventoryError
from hostkit.inventory import load_inventory, parse_inventory

REPO = Path(__file__).resolve().parent.parent

BASE = {
    "defaults": {"port": 9000, "session_timeout": 100},
    "groups": {"arm": {"cross_compiler": "aarch64-linux-gnu-gcc", "port": 9100},
               "slow": {"port": 9200, "session_timeout": 900}},
    "devices": {
        "a": {"target": {"kind": "llvm"}},
        "b": {"target": "raspberry-pi/4b-aarch64", "groups": ["arm"]},
        "c": {"target": "raspberry-pi/4b-aarch64", "groups": ["arm", "slow"], "port": 9300},
        "d": {"target": "raspberry-pi/4b-aarch64", "groups": ["slow", "arm"]},
    },
}


def test_precedence_defaults_groups_device_flags() -> None:
    inv = parse_inventory(BASE)
    assert inv.get("a").port == 9000 and inv.get("a").session_timeout == 100.0
    assert inv.get("b").port == 9100 and inv.get("b").cross_compiler == "aarch64-linux-gnu-gcc"
    assert inv.get("c").port == 9300 and inv.get("c").session_timeout == 900.0
    assert inv.get("a").stall_timeout == 30.0 and inv.get("a").retries == 1, "the defaults"
    # later groups in the device's list win
    assert inv.get("d").port == 9100
    assert inv.get("c").with_overrides(port=1234, format=None).port == 1234
    assert [d.name for d in inv.group("arm")] == ["b", "c", "d"]


def test_shipped_inventory_is_valid() -> None:
    inv = load_inventory(REPO / "inventory.yaml")
    assert {"local", "pi4", "pi4-emu", "jetson"} <= set(inv.devices)
    assert inv.get("local").managed == "local"
    assert inv.get("pi4-emu").emulated is True
    assert any(d.transport == "tracker" for d in inv.devices.values())
    x86 = [d for d in inv.devices.values()
           if isinstance(d.target, dict) and "mtriple" not in d.target and d.name != "local"]
    assert x86, "the shipped inventory has an x86 box"


def test_json_string_target_is_parsed() -> None:
    inv = parse_inventory({"devices": {"x": {"target": '{"kind": "llvm", "mcpu": "skylake"}'}}})
    assert inv.get("x").target == {"kind": "llvm", "mcpu": "skylake"}


def test_ssh_settings_merge_from_group() -> None:
    inv = parse_inventory({
        "groups": {"g": {"ssh": {"user": "pi", "port": 2222}}},
        "devices": {"x": {"target": {"kind": "llvm"}, "transport": "ssh", "host": "h",
                          "groups": ["g"], "ssh": {"key_file": "k"}}},
    })
    ssh = inv.get("x").ssh
    assert (ssh.user, ssh.port, ssh.key_file, ssh.host_key_policy) == ("pi", 2222, "k", "strict")


BAD = [
    ({"devices": {"x": {"target": {"kind": "llvm"}, "prot": 1}}},
     "inventory: unknown key 'devices.x.prot'; did you mean 'port'?"),
    ({"devices": {"x": {"target": {"kind": "llvm"}, "ssh": {"usr": "pi"}}}},
     "inventory: unknown key 'devices.x.ssh.usr'; did you mean 'user'?"),
    ({"defaults": {"transprt": "rpc"}, "devices": {"x": {"target": {"kind": "llvm"}}}},
     "inventory: unknown key 'defaults.transprt'; did you mean 'transport'?"),
    ({"devices": {"x": {"target": {"kind": "llvm"}, "port": "9090"}}},
     "inventory: devices.x.port must be int, got str '9090'"),
    ({"devices": {"x": {"target": {"kind": "llvm"}, "port": True}}},
     "inventory: devices.x.port must be int, got bool True"),
    ({"devices": {"x": {"target": {"kind": "llvm"}, "port": 70000}}},
     "inventory: devices.x.port must be between 1 and 65535, got 70000"),
    ({"devices": {"x": {"target": {"kind": "llvm"}, "transport": "shh"}}},
     "inventory: devices.x.transport is 'shh'; did you mean 'ssh'? expected one of: rpc, tracker, ssh"),
    ({"devices": {"x": {"host": "h"}}},
     "inventory: devices.x.target is missing; give a TVM tag such as 'raspberry-pi/4b-aarch64' or "
     "a dict such as {kind: llvm}"),
    ({"devices": {"x": {"target": {"kind": "llvm"}, "transport": "tracker"}}},
     "inventory: devices.x uses transport 'tracker' and needs both 'tracker: HOST:PORT' and 'key'"),
    ({"devices": {}}, "inventory: no devices defined under 'devices:'"),
    ({"device": {}}, "inventory: unknown key 'device'; did you mean 'devices'?"),
    ({"groups": {"g": {"hots": "x"}}, "devices": {"x": {"target": {"kind": "llvm"}}}},
     "inventory: unknown key 'groups.g.hots'; did you mean 'host'?"),
    ({"devices": {"x": {"target": {"kind": "llvm"}, "session_timeout": -5}}},
     "inventory: devices.x.session_timeout must be a number of seconds above 0 and at most 604800, "
     "got -5"),
    ({"defaults": {"connect_timeout": 0}, "devices": {"x": {"target": {"kind": "llvm"}}}},
     "inventory: defaults.connect_timeout must be a number of seconds above 0 and at most 3600, "
     "got 0"),
    ({"devices": {"x": {"target": {"kind": "llvm"}, "connect_timeout": float("nan")}}},
     "inventory: devices.x.connect_timeout must be a number of seconds above 0 and at most 3600, "
     "got nan"),
    ({"devices": {"x": {"target": {"kind": "llvm"}, "stall_timeout": 0}}},
     "inventory: devices.x.stall_timeout must be a number of seconds above 0 and at most 3600, "
     "got 0"),
    ({"defaults": {"retries": -1}, "devices": {"x": {"target": {"kind": "llvm"}}}},
     "inventory: defaults.retries must be a whole number from 0 to 10, got -1"),
    ({"devices": {"x": {"target": {"kind": "llvm"}, "retries": 1.5}}},
     "inventory: devices.x.retries must be int, got float 1.5"),
    ({"devices": {"x": {"target": {"kind": "llvm"}, "port": 10**40}}},
     "inventory: devices.x.port must be between 1 and 65535, got 10000000000000000000000000000000000"
     "000000"),
    ({"devices": {"x": {"target": {"kind": "llvm"}, "tracker": "h:99999"}}},
     "inventory: devices.x.tracker must be HOST:PORT with a port from 1 to 65535, got 'h:99999'"),
    ({"devices": {"x": {"target": {"kind": "llvm"}, "host": "a..b"}}},
     "inventory: devices.x.host is not a valid host name: 'a..b' (each part between dots is 1 to 63 "
     "characters)"),
    ({"devices": {"x": {"target": {"kind": "llvm"}, "host": "pi\x00"}}},
     "inventory: devices.x.host holds the unprintable character '\\x00'; write it on one line "
     "without control characters"),
    ({"devices": {"a\nb": {"target": {"kind": "llvm"}}}},
     "inventory: device names must be printable strings of 1 to 100 characters, got 'a\\nb'"),
    ({"devices": {"pi\u00e4": {"target": {"kind": "llvm"}, "descripti\u00f6n": 1}}},
     "inventory: unknown key 'devices.pi\u00e4.descripti\u00f6n'; did you mean 'description'?"),
    ({"devices": {"x": {"target": {"kind": "llvm", "mcpu": None}}}},
     "inventory: devices.x.target.mcpu must be a string, number, list or mapping, got NoneType None"),
    ({"groups": {"arm": {"target": '{"mcpu": "a72"}'}},
      "devices": {"x": {"groups": ["arm"]}}},
     "inventory: groups.arm.target needs a 'kind' (llvm, cuda, ...)"),
]


@pytest.mark.parametrize(("data", "message"), BAD)
def test_bad_inventory_exact_error(data: dict, message: str) -> None:
    with pytest.raises(InventoryError) as err:
        parse_inventory(data)
    assert str(err.value) == message


def test_duplicate_device_names_rejected(tmp_path: Path) -> None:
    path = tmp_path / "inv.yaml"
    path.write_text("devices:\n  a:\n    target: {kind: llvm}\n  a:\n    target: {kind: llvm}\n")
    with pytest.raises(InventoryError) as err:
        load_inventory(path)
    assert str(err.value) == (f"{path} line 4: duplicate key 'a'; each device, group and setting "
                              "may appear once")


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match="inventory file .*nope.yaml not found"):
        load_inventory(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("devices: [unclosed\n")
    with pytest.raises(InventoryError, match=r"bad.yaml line \d+: not valid YAML"):
        load_inventory(bad)


def test_unknown_device_and_group_list_known_names() -> None:
    inv = parse_inventory(BASE)
    with pytest.raises(InventoryError) as err:
        inv.get("bb")
    assert str(err.value) == ("unknown device 'bb' in the inventory; did you mean 'b'? known "
                              "devices: a, b, c, d")
    with pytest.raises(InventoryError, match="unknown group 'armm'.*known groups: arm, slow"):
        inv.group("armm")


def _refused(path: Path) -> str:
    start = time.perf_counter()
    with pytest.raises(InventoryError) as err:
        load_inventory(path)
    assert time.perf_counter() - start < 2.0, "a hostile inventory must be refused at once"
    return str(err.value)


def test_alias_bomb_refused_before_it_expands(tmp_path: Path) -> None:
    """Nine levels of nine aliases would be 9**9 strings; the aliases are counted first."""
    levels = ['&a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    levels += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    path = tmp_path / "bomb.yaml"
    path.write_text("devices:\n  x:\n    target: {kind: llvm}\n    description:\n"
                    + "".join(f"      - {level}\n" for level in levels))
    assert _refused(path) == (f"{path} line 9: more than 32 aliases (*name); an inventory needs few "
                              "or none: share settings through groups or defaults")


@pytest.mark.parametrize(("text", "message"), [
    ("devices: &a\n  x: *a\n", "line 2: alias *a sits inside the value it names"),
    ("devices: " + "{a: " * 40 + "1" + "}" * 40 + "\n", "line 1: nested more than 16 levels deep"),
    ("d: &a [[[[[[[[[[1]]]]]]]]]]\ne: [[[[[[[*a]]]]]]]\n",
     "line 2: nested more than 16 levels deep"),
    ("devices: [" + ",".join(["1"] * 200_001) + "]\n",
     "line 1: expands to more than 200000 values (aliases counted expanded); an inventory needs far "
     "fewer"),
    ("devices:\n  x:\n    port: " + "9" * 5000 + "\n",
     ": holds a value edgekit cannot read: Exceeds the limit (4300 digits) for integer string "
     "conversion: value has 5000 digits"),
    ("devices:\n  ? [a]\n  : 1\n", "line 2: not valid YAML: found unhashable key"),
])
def test_hostile_yaml_is_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "inv.yaml"
    path.write_text(text)
    assert _refused(path) == f"{path}{' ' if message.startswith('line') else ''}{message}"


def test_merge_keys_still_share_settings(tmp_path: Path) -> None:
    path = tmp_path / "inv.yaml"
    path.write_text("groups:\n  arm: &base {port: 9000}\n"
                    "devices:\n  x:\n    <<: *base\n    target: {kind: llvm}\n")
    assert load_inventory(path).get("x").port == 9000


def test_oversized_and_binary_files_name_the_file(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (1 << 20) + b"\n")
    assert _refused(big) == (f"{big}: larger than 1 MiB; an inventory is a short YAML file (is this "
                             "the right file?)")
    junk = tmp_path / "junk.yaml"
    junk.write_bytes(bytes(range(128, 256)) * 100)
    assert _refused(junk) == (f"{junk}: not UTF-8 text (byte 0x80 at offset 0); an inventory is a "
                              "YAML text file")


def test_a_big_fleet_is_listed_in_one_short_line() -> None:
    inv = parse_inventory({"devices": {f"pi{i}": {"target": {"kind": "llvm"}} for i in range(25)}})
    with pytest.raises(InventoryError) as err:
        inv.get("nuc\n")
    assert str(err.value).endswith("pi18, pi19 and 5 more")
    assert "unknown device 'nuc\\n'" in str(err.value)
