"""The fleet: `inventory.yaml` parsed strictly into frozen dataclasses.

Vocabulary (Ansible-like)::

    defaults:            settings every device starts from
    groups:
      arm:               settings for the devices that name this group
        cross_compiler: aarch64-linux-gnu-gcc
    devices:
      pi4:
        target: raspberry-pi/4b-aarch64
        host: pi4.local
        groups: [arm]

Precedence, lowest to highest: defaults < groups (in the order the device lists them) < the
device itself < command-line flags. The file is data, never code: YAML's safe loader, and every key
is checked, so a typo is one line naming its dotted path with a did-you-mean.

The file is read as untrusted input, within limits (`hostkit.yamlfile`); every value is checked
here, numbers against their range; what TVM makes of each target is checked above this module, by
`hostkit.build.targets.check_inventory_targets`, which the CLI runs on every inventory it loads.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from hostkit.defaults import (
    CONNECT_RETRIES,
    CONNECT_TIMEOUT_S,
    DEFAULT_PORT,
    SESSION_TIMEOUT_S,
    STALL_TIMEOUT_S,
)
from hostkit.errors import InventoryError, first_line, shown
from hostkit.yamlfile import MAX_DEPTH, load_yaml_file

__all__ = ["Device", "SshSettings", "Inventory", "load_inventory", "parse_inventory",
           "TRANSPORTS", "MANAGED", "FORMATS", "CUDA_KERNELS"]

TRANSPORTS = ("rpc", "tracker", "ssh")
# Devices edgekit starts itself when nothing answers at their address.
MANAGED = ("none", "local", "qemu-arm64")
FORMATS = ("so", "tar")
CUDA_KERNELS = ("cubin", "ptx")
HOST_KEY_POLICIES = ("strict", "accept-new")

# Longest wait edgekit accepts for a connection and for one RPC session, in seconds.
MAX_CONNECT_TIMEOUT_S = 3600.0
MAX_SESSION_TIMEOUT_S = 7 * 86400.0
MAX_RETRIES = 10


@dataclass(frozen=True)
class SshSettings:
    """How to reach a board over SSH; the RPC daemon there stays on its own loopback."""

    port: int = 22
    user: str | None = None
    key_file: str | None = None
    known_hosts: str | None = None
    host_key_policy: str = "strict"
    work_dir: str = "~/.edgekit"
    python: str = "python3"
    rpc_port: int = DEFAULT_PORT


@dataclass(frozen=True)
class Device:
    """One board, with every setting resolved (defaults, groups and its own keys merged)."""

    name: str
    target: str | Mapping[str, Any]
    transport: str = "rpc"
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    tracker: str | None = None
    key: str | None = None
    cross_compiler: str | None = None
    session_timeout: float = SESSION_TIMEOUT_S
    connect_timeout: float = CONNECT_TIMEOUT_S
    stall_timeout: float = STALL_TIMEOUT_S
    retries: int = CONNECT_RETRIES
    format: str = "so"
    cuda_kernels: str = "cubin"  # a CUDA target's kernels: cubin for its arch, or ptx
    managed: str = "none"
    emulated: bool = False
    description: str = ""
    groups: tuple[str, ...] = ()
    ssh: SshSettings = field(default_factory=SshSettings)

    @property
    def address(self) -> str:
        if self.transport == "tracker":
            return f"tracker {self.tracker} key {self.key}"
        if self.transport == "ssh":
            return f"ssh {self.ssh.user + '@' if self.ssh.user else ''}{self.host}:{self.ssh.port}"
        return f"{self.host}:{self.port}"

    def target_text(self) -> str:
        return self.target if isinstance(self.target, str) else json.dumps(dict(self.target),
                                                                           sort_keys=True)

    def with_overrides(self, **overrides: Any) -> "Device":
        """Command-line flags: the top of the precedence order."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class Inventory:
    path: Path | None
    devices: Mapping[str, Device]
    groups: Mapping[str, tuple[str, ...]]
    # Where each device's target is written (`devices.pi4.target`, `groups.arm.target`, ...).
    target_keys: Mapping[str, str] = field(default_factory=dict)

    def get(self, name: str) -> Device:
        if name in self.devices:
            return self.devices[name]
        close = difflib.get_close_matches(name, list(self.devices), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise InventoryError(f"unknown device {shown(name)} in {self._where()}; {hint}known "
                             f"devices: {_listed(self.devices)}")

    def group(self, name: str) -> list[Device]:
        if name not in self.groups:
            raise InventoryError(f"unknown group {shown(name)} in {self._where()}; known groups: "
                                 f"{_listed(self.groups)}")
        return [self.devices[d] for d in self.groups[name]]

    def _where(self) -> str:
        return str(self.path) if self.path else "the inventory"


def _printable(value: str) -> str | None:
    bad = next((c for c in value if not c.isprintable()), None)
    return None if bad is None else (f"holds the unprintable character {bad!r}; write it on one "
                                     "line without control characters")


def _port(value: int) -> str | None:
    return None if 1 <= value <= 65535 else f"must be between 1 and 65535, got {shown(value)}"


def _host(value: str) -> str | None:
    problem = _printable(value)
    if problem:
        return problem
    if not value or len(value) > 253 or any(c.isspace() for c in value):
        return f"must be a host name or an IP address, got {shown(value)}"
    try:
        value.encode("idna")
    except UnicodeError:
        return (f"is not a valid host name: {shown(value)} (each part between dots is 1 to 63 "
                "characters)")
    return None


def _tracker(value: str) -> str | None:
    host, sep, port = value.rpartition(":")
    if (not sep or _host(host) is not None or not port.isascii() or not port.isdigit()
            or len(port) > 5 or _port(int(port)) is not None):
        return f"must be HOST:PORT with a port from 1 to 65535, got {shown(value)}"
    return None


def _seconds(most: float) -> Callable[[float], str | None]:
    def check(value: float) -> str | None:
        if 0 < value <= most:  # false for nan too
            return None
        return f"must be a number of seconds above 0 and at most {most:g}, got {shown(value)}"

    return check


def _retries(value: int) -> str | None:
    return None if 0 <= value <= MAX_RETRIES else (f"must be a whole number from 0 to "
                                                   f"{MAX_RETRIES}, got {shown(value)}")


def _listed(names: Mapping[str, Any], most: int = 20) -> str:
    """Names for a message: the first few, and how many more, so a big fleet stays one line."""
    shown_names = ", ".join(list(names)[:most]) or "none"
    return shown_names + (f" and {len(names) - most} more" if len(names) > most else "")


# Each settable key, the Python types it accepts, and a check of its value: the choices, or a
# function that returns what is wrong with it.
_Spec = tuple[tuple[type, ...], "tuple[str, ...] | Callable[[Any], str | None] | None"]
_DEVICE_KEYS: dict[str, _Spec] = {
    "target": ((str, dict), None),  # its contents: _check_target
    "transport": ((str,), TRANSPORTS),
    "host": ((str,), _host),
    "port": ((int,), _port),
    "tracker": ((str,), _tracker),
    "key": ((str,), _printable),
    "cross_compiler": ((str,), _printable),
    "session_timeout": ((int, float), _seconds(MAX_SESSION_TIMEOUT_S)),
    "connect_timeout": ((int, float), _seconds(MAX_CONNECT_TIMEOUT_S)),
    "stall_timeout": ((int, float), _seconds(MAX_CONNECT_TIMEOUT_S)),
    "retries": ((int,), _retries),
    "format": ((str,), FORMATS),
    "cuda_kernels": ((str,), CUDA_KERNELS),
    "managed": ((str,), MANAGED),
    "emulated": ((bool,), None),
    "description": ((str,), None),
    "ssh": ((dict,), None),
}
_SSH_KEYS: dict[str, _Spec] = {
    "port": ((int,), _port),
    "user": ((str,), _printable),
    "key_file": ((str,), _printable),
    "known_hosts": ((str,), _printable),
    "host_key_policy": ((str,), HOST_KEY_POLICIES),
    "work_dir": ((str,), _printable),
    "python": ((str,), _printable),
    "rpc_port": ((int,), _port),
}
_TOP_KEYS = ("defaults", "groups", "devices")


def load_inventory(path: str | Path) -> Inventory:
    path = Path(path)
    if not os.path.isfile(path):
        raise InventoryError(f"inventory file {path} not found; pass --inventory FILE or create it "
                             "(see inventory.yaml in the edgekit repository)")
    return parse_inventory(load_yaml_file(path), path)


def parse_inventory(data: Any, path: Path | None = None) -> Inventory:
    where = str(path) if path else "inventory"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InventoryError(f"{where}: expected a mapping with keys {', '.join(_TOP_KEYS)}")
    _check_keys(data, _TOP_KEYS, "", where)
    defaults = _section(data, "defaults", where)
    _check_settings(defaults, "defaults", where)
    groups_raw = _section(data, "groups", where)
    for gname, gsettings in groups_raw.items():
        _check_name(gname, "group", where)
        if not isinstance(gsettings, dict):
            raise InventoryError(f"{where}: groups.{gname} must be a mapping of settings")
        _check_settings(gsettings, f"groups.{gname}", where)
    devices_raw = _section(data, "devices", where)
    if not devices_raw:
        raise InventoryError(f"{where}: no devices defined under 'devices:'")

    devices: dict[str, Device] = {}
    target_keys: dict[str, str] = {}
    members: dict[str, list[str]] = {g: [] for g in groups_raw}
    for name, raw in devices_raw.items():
        _check_name(name, "device", where)
        raw = raw or {}
        if not isinstance(raw, dict):
            raise InventoryError(f"{where}: devices.{name} must be a mapping of settings")
        dev_groups = raw.get("groups", [])
        if isinstance(dev_groups, str):
            dev_groups = [dev_groups]
        if not isinstance(dev_groups, list) or not all(isinstance(g, str) for g in dev_groups):
            raise InventoryError(f"{where}: devices.{name}.groups must be a list of group names")
        for group in dev_groups:
            _check_name(group, "group", where)
        if len(set(dev_groups)) != len(dev_groups):
            raise InventoryError(f"{where}: devices.{name}.groups names a group twice")
        settings = {k: v for k, v in raw.items() if k != "groups"}
        _check_settings(settings, f"devices.{name}", where, extra=("groups",))
        merged: dict[str, Any] = dict(defaults)
        target_key = "defaults.target" if "target" in defaults else f"devices.{name}.target"
        for group in dev_groups:
            if group not in groups_raw:
                members.setdefault(group, [])
            else:
                _merge(merged, groups_raw[group])
                if "target" in groups_raw[group]:
                    target_key = f"groups.{group}.target"
            members[group].append(name)
        _merge(merged, settings)
        if "target" in settings:
            target_key = f"devices.{name}.target"
        devices[name] = _build_device(name, merged, tuple(dev_groups), where, target_key)
        target_keys[name] = target_key
    return Inventory(path=path, devices=devices,
                     groups={g: tuple(m) for g, m in members.items()}, target_keys=target_keys)


def _check_name(name: Any, what: str, where: str) -> None:
    if not isinstance(name, str) or not name or len(name) > 100 or not name.isprintable():
        raise InventoryError(f"{where}: {what} names must be printable strings of 1 to 100 "
                             f"characters, got {shown(name)}")


def _section(data: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise InventoryError(f"{where}: '{key}' must be a mapping")
    return value


def _merge(into: dict[str, Any], settings: Mapping[str, Any]) -> None:
    for key, value in settings.items():
        if key == "ssh" and isinstance(value, dict):
            into["ssh"] = {**into.get("ssh", {}), **value}
        else:
            into[key] = value


def _key_text(key: Any) -> str:
    if isinstance(key, str):
        return key if key.isprintable() else shown(key)[1:-1]
    return shown(key)


def _check_keys(mapping: Mapping[str, Any], allowed: tuple[str, ...] | list[str], prefix: str,
                where: str) -> None:
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; allowed: {', '.join(allowed)}"
            raise InventoryError(f"{where}: unknown key '{prefix}{_key_text(key)}'{hint}")


def _check_settings(settings: Mapping[str, Any], prefix: str, where: str,
                    extra: tuple[str, ...] = ()) -> None:
    _check_keys(settings, [*_DEVICE_KEYS, *extra], f"{prefix}.", where)
    for key, value in settings.items():
        if key in extra:
            continue
        _check_value(value, _DEVICE_KEYS[key], f"{prefix}.{key}", where)
        if key == "target":
            _check_target(value, f"{prefix}.target", where)
        if key == "ssh":
            _check_keys(value, list(_SSH_KEYS), f"{prefix}.ssh.", where)
            for skey, svalue in value.items():
                _check_value(svalue, _SSH_KEYS[skey], f"{prefix}.ssh.{skey}", where)


def _check_value(value: Any, spec: _Spec, dotted: str, where: str) -> None:
    types, allowed = spec
    # bool is an int in Python; a port of `true` is still a mistake.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        names = " or ".join("mapping" if t is dict else t.__name__ for t in types)
        raise InventoryError(f"{where}: {dotted} must be {names}, got {type(value).__name__} "
                             f"{shown(value)}")
    if isinstance(value, float) and not math.isfinite(value) and allowed is None:
        raise InventoryError(f"{where}: {dotted} must be a finite number, got {value}")
    if isinstance(allowed, tuple):
        if value not in allowed:
            close = difflib.get_close_matches(str(value), list(allowed), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise InventoryError(f"{where}: {dotted} is {shown(value)}; {hint}expected one of: "
                                 f"{', '.join(allowed)}")
    elif allowed is not None:
        problem = allowed(value)
        if problem:
            raise InventoryError(f"{where}: {dotted} {problem}")


def _check_target(value: Any, dotted: str, where: str, depth: int = 0) -> None:
    """A target holds what JSON can: TVM reads it as a JSON config (strings, numbers, lists,
    mappings); what TVM makes of it is checked by hostkit.build.targets."""
    if depth > MAX_DEPTH:
        raise InventoryError(f"{where}: {dotted} is nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or not key.isprintable():
                raise InventoryError(f"{where}: {dotted} has the option name {shown(key)}; TVM "
                                     "option names are strings such as kind, mtriple, mcpu")
            _check_target(item, f"{dotted}.{key}", where, depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_target(item, f"{dotted}[{index}]", where, depth + 1)
    elif isinstance(value, str):
        problem = _printable(value)
        if problem:
            raise InventoryError(f"{where}: {dotted} {problem}")
    elif isinstance(value, float) and not math.isfinite(value):
        raise InventoryError(f"{where}: {dotted} must be a finite number, got {value}")
    elif not isinstance(value, (bool, int, float)):
        raise InventoryError(f"{where}: {dotted} must be a string, number, list or mapping, got "
                             f"{type(value).__name__} {shown(value)}")


def _build_device(name: str, merged: dict[str, Any], groups: tuple[str, ...], where: str,
                  target_key: str) -> Device:
    if "target" not in merged:
        raise InventoryError(f"{where}: devices.{name}.target is missing; give a TVM tag such as "
                             "'raspberry-pi/4b-aarch64' or a dict such as {kind: llvm}")
    target = merged["target"]
    if isinstance(target, str) and target.lstrip().startswith("{"):
        try:
            target = json.loads(target)
        except (ValueError, RecursionError) as exc:
            raise InventoryError(f"{where}: {target_key} is not valid JSON: "
                                 f"{first_line(exc)}") from exc
        if not isinstance(target, dict):
            raise InventoryError(f"{where}: {target_key} must be a JSON object")
        _check_target(target, target_key, where)
    if isinstance(target, dict) and "kind" not in target:
        raise InventoryError(f"{where}: {target_key} needs a 'kind' (llvm, cuda, ...)")
    transport = merged.get("transport", "rpc")
    if transport == "tracker" and not (merged.get("tracker") and merged.get("key")):
        raise InventoryError(f"{where}: devices.{name} uses transport 'tracker' and needs both "
                             "'tracker: HOST:PORT' and 'key'")
    ssh_raw = merged.pop("ssh", {})
    values = {k: v for k, v in merged.items() if k in {f.name for f in fields(Device)}}
    values["target"] = target
    if "session_timeout" in values:
        values["session_timeout"] = float(values["session_timeout"])
    for key in ("connect_timeout", "stall_timeout"):
        if key in values:
            values[key] = float(values[key])
    if values.get("managed") == "qemu-arm64":
        values.setdefault("emulated", True)
    return Device(name=name, groups=groups, ssh=SshSettings(**ssh_raw), **values)
