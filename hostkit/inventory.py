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
device itself < command-line flags. The file is data, never code: `yaml.safe_load`, and every key
is checked, so a typo is one line naming its dotted path with a did-you-mean.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from hostkit.defaults import CONNECT_TIMEOUT_S, DEFAULT_PORT, SESSION_TIMEOUT_S
from hostkit.errors import InventoryError

__all__ = ["Device", "SshSettings", "Inventory", "load_inventory", "parse_inventory",
           "TRANSPORTS", "MANAGED", "FORMATS"]

TRANSPORTS = ("rpc", "tracker", "ssh")
# Devices edgekit starts itself when nothing answers at their address.
MANAGED = ("none", "local", "qemu-arm64")
FORMATS = ("so", "tar")
HOST_KEY_POLICIES = ("strict", "accept-new")


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
    format: str = "so"
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

    def get(self, name: str) -> Device:
        if name in self.devices:
            return self.devices[name]
        known = ", ".join(self.devices) or "none"
        close = difflib.get_close_matches(name, list(self.devices), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise InventoryError(f"unknown device '{name}' in {self._where()}; {hint}known devices: {known}")

    def group(self, name: str) -> list[Device]:
        if name not in self.groups:
            known = ", ".join(self.groups) or "none"
            raise InventoryError(f"unknown group '{name}' in {self._where()}; known groups: {known}")
        return [self.devices[d] for d in self.groups[name]]

    def _where(self) -> str:
        return str(self.path) if self.path else "the inventory"


# Each settable key, the Python types it accepts, and a check of its value.
_DEVICE_KEYS: dict[str, tuple[tuple[type, ...], Any]] = {
    "target": ((str, dict), None),
    "transport": ((str,), TRANSPORTS),
    "host": ((str,), None),
    "port": ((int,), range(1, 65536)),
    "tracker": ((str,), None),
    "key": ((str,), None),
    "cross_compiler": ((str,), None),
    "session_timeout": ((int, float), None),
    "connect_timeout": ((int, float), None),
    "format": ((str,), FORMATS),
    "managed": ((str,), MANAGED),
    "emulated": ((bool,), None),
    "description": ((str,), None),
    "ssh": ((dict,), None),
}
_SSH_KEYS: dict[str, tuple[tuple[type, ...], Any]] = {
    "port": ((int,), range(1, 65536)),
    "user": ((str,), None),
    "key_file": ((str,), None),
    "known_hosts": ((str,), None),
    "host_key_policy": ((str,), HOST_KEY_POLICIES),
    "work_dir": ((str,), None),
    "python": ((str,), None),
    "rpc_port": ((int,), range(1, 65536)),
}
_TOP_KEYS = ("defaults", "groups", "devices")


def load_inventory(path: str | Path) -> Inventory:
    path = Path(path)
    if not path.is_file():
        raise InventoryError(f"inventory file {path} not found; pass --inventory FILE or create it "
                             "(see inventory.yaml in the edgekit repository)")
    import yaml

    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_strict_loader())  # noqa: S506
    except _DuplicateKey as exc:
        raise InventoryError(f"{path} line {exc.line}: duplicate key '{exc.key}'; each device, group "
                             "and setting may appear once") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise InventoryError(f"{path}{line}: not valid YAML: "
                             f"{getattr(exc, 'problem', None) or exc}") from exc
    return parse_inventory(data, path)


class _DuplicateKey(Exception):
    def __init__(self, key: str, line: int) -> None:
        super().__init__(key)
        self.key = key
        self.line = line


def _strict_loader() -> type:
    """yaml's SafeLoader, but a key given twice is an error instead of silently winning."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise _DuplicateKey(str(key), key_node.start_mark.line + 1)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


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
        if not isinstance(gsettings, dict):
            raise InventoryError(f"{where}: groups.{gname} must be a mapping of settings")
        _check_settings(gsettings, f"groups.{gname}", where)
    devices_raw = _section(data, "devices", where)
    if not devices_raw:
        raise InventoryError(f"{where}: no devices defined under 'devices:'")

    devices: dict[str, Device] = {}
    members: dict[str, list[str]] = {g: [] for g in groups_raw}
    for name, raw in devices_raw.items():
        if not isinstance(name, str) or not name:
            raise InventoryError(f"{where}: device names must be non-empty strings, got {name!r}")
        raw = raw or {}
        if not isinstance(raw, dict):
            raise InventoryError(f"{where}: devices.{name} must be a mapping of settings")
        dev_groups = raw.get("groups", [])
        if isinstance(dev_groups, str):
            dev_groups = [dev_groups]
        if not isinstance(dev_groups, list) or not all(isinstance(g, str) for g in dev_groups):
            raise InventoryError(f"{where}: devices.{name}.groups must be a list of group names")
        settings = {k: v for k, v in raw.items() if k != "groups"}
        _check_settings(settings, f"devices.{name}", where, extra=("groups",))
        merged: dict[str, Any] = dict(defaults)
        for group in dev_groups:
            if group not in groups_raw:
                members.setdefault(group, [])
            else:
                _merge(merged, groups_raw[group])
            members[group].append(name)
        _merge(merged, settings)
        devices[name] = _build_device(name, merged, tuple(dev_groups), where)
    return Inventory(path=path, devices=devices,
                     groups={g: tuple(m) for g, m in members.items()})


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


def _check_keys(mapping: Mapping[str, Any], allowed: tuple[str, ...] | list[str], prefix: str,
                where: str) -> None:
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; allowed: {', '.join(allowed)}"
            raise InventoryError(f"{where}: unknown key '{prefix}{key}'{hint}")


def _check_settings(settings: Mapping[str, Any], prefix: str, where: str,
                    extra: tuple[str, ...] = ()) -> None:
    _check_keys(settings, [*_DEVICE_KEYS, *extra], f"{prefix}.", where)
    for key, value in settings.items():
        if key in extra:
            continue
        _check_value(value, _DEVICE_KEYS[key], f"{prefix}.{key}", where)
        if key == "ssh":
            _check_keys(value, list(_SSH_KEYS), f"{prefix}.ssh.", where)
            for skey, svalue in value.items():
                _check_value(svalue, _SSH_KEYS[skey], f"{prefix}.ssh.{skey}", where)


def _check_value(value: Any, spec: tuple[tuple[type, ...], Any], dotted: str, where: str) -> None:
    types, allowed = spec
    # bool is an int in Python; a port of `true` is still a mistake.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        names = " or ".join("mapping" if t is dict else t.__name__ for t in types)
        raise InventoryError(f"{where}: {dotted} must be {names}, got {type(value).__name__} "
                             f"{value!r}")
    if allowed is not None and value not in allowed:
        if isinstance(allowed, range):
            raise InventoryError(f"{where}: {dotted} must be between {allowed.start} and "
                                 f"{allowed.stop - 1}, got {value}")
        close = difflib.get_close_matches(str(value), list(allowed), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise InventoryError(f"{where}: {dotted} is '{value}'; {hint}expected one of: "
                             f"{', '.join(allowed)}")


def _build_device(name: str, merged: dict[str, Any], groups: tuple[str, ...], where: str) -> Device:
    if "target" not in merged:
        raise InventoryError(f"{where}: devices.{name}.target is missing; give a TVM tag such as "
                             "'raspberry-pi/4b-aarch64' or a dict such as {kind: llvm}")
    target = merged["target"]
    if isinstance(target, str) and target.lstrip().startswith("{"):
        try:
            target = json.loads(target)
        except json.JSONDecodeError as exc:
            raise InventoryError(f"{where}: devices.{name}.target is not valid JSON: {exc}") from exc
    if isinstance(target, dict) and "kind" not in target:
        raise InventoryError(f"{where}: devices.{name}.target needs a 'kind' (llvm, cuda, ...)")
    transport = merged.get("transport", "rpc")
    if transport == "tracker" and not (merged.get("tracker") and merged.get("key")):
        raise InventoryError(f"{where}: devices.{name} uses transport 'tracker' and needs both "
                             "'tracker: HOST:PORT' and 'key'")
    tracker = merged.get("tracker")
    if tracker is not None:
        host, sep, port = tracker.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise InventoryError(f"{where}: devices.{name}.tracker must be HOST:PORT, got {tracker!r}")
    ssh_raw = merged.pop("ssh", {})
    values = {k: v for k, v in merged.items() if k in {f.name for f in fields(Device)}}
    values["target"] = target
    if "session_timeout" in values:
        values["session_timeout"] = float(values["session_timeout"])
    if "connect_timeout" in values:
        values["connect_timeout"] = float(values["connect_timeout"])
    if values.get("managed") == "qemu-arm64":
        values.setdefault("emulated", True)
    return Device(name=name, groups=groups, ssh=SshSettings(**ssh_raw), **values)
