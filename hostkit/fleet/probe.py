"""Reachability for `edgekit devices`: a short TCP probe, then what the daemon says about itself.

Managed devices that are not running are reported as such, not probed: edgekit starts them on use,
and probing an emulated board's address before its namespace exists would send traffic off-host.
"""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hostkit.defaults import PROBE_TIMEOUT_S
from hostkit.inventory import Device
from hostkit.net import port_open

__all__ = ["probe", "probe_all"]


def probe_all(devices: list[Device]) -> list[dict[str, Any]]:
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(devices)))) as pool:
        return list(pool.map(probe, devices))


def probe(device: Device) -> dict[str, Any]:
    row: dict[str, Any] = {"device": device.name, "transport": device.transport,
                           "address": device.address, "target": device.target_text(),
                           "groups": list(device.groups), "status": "unreachable", "reports": "",
                           "info": None}
    if device.managed != "none":
        from hostkit.boards.launch import launcher_for

        launcher = launcher_for(device)
        if launcher.running():
            host, port = launcher.address()
        elif launcher.attach_to_existing and port_open(device.host, device.port, PROBE_TIMEOUT_S):
            host, port = device.host, device.port
        else:
            row["status"] = "on demand"
            row["reports"] = f"edgekit starts it when used ({device.managed})"
            return row
        return _probe_rpc(row, device, host, port)
    if device.transport == "ssh":
        return _probe_tcp(row, device.host, device.ssh.port, "ssh port open; "
                          f"`edgekit doctor --device {device.name}` checks the rest")
    if device.transport == "tracker":
        tracker_host, _, tracker_port = (device.tracker or "").rpartition(":")
        return _probe_tcp(row, tracker_host, int(tracker_port), f"tracker answers; key {device.key}")
    return _probe_rpc(row, device, device.host, device.port)


def _resolve(row: dict[str, Any], host: str) -> bool:
    try:
        socket.getaddrinfo(host, None)
        return True
    except OSError:
        row["reports"] = f"cannot resolve host {host}"
        return False


def _probe_tcp(row: dict[str, Any], host: str, port: int, ok_text: str) -> dict[str, Any]:
    if not _resolve(row, host):
        return row
    if port_open(host, port, PROBE_TIMEOUT_S):
        row["status"], row["reports"] = "reachable", ok_text
    else:
        row["reports"] = f"nothing answers at {host}:{port}"
    return row


def _probe_rpc(row: dict[str, Any], device: Device, host: str, port: int) -> dict[str, Any]:
    if not _resolve(row, host):
        return row
    if not port_open(host, port, PROBE_TIMEOUT_S):
        row["reports"] = f"nothing answers at {host}:{port}"
        return row
    try:
        from tvm import rpc

        sess = rpc.connect(host, port, session_timeout=30)
        info = json.loads(sess.get_function("edgekit.device_info")())
    except Exception as exc:
        row["status"], row["reports"] = "unreachable", f"port open but not an edgekit daemon: {exc}"
        return row
    row["status"], row["info"] = "reachable", info
    row["reports"] = (f"{info.get('arch')} · {info.get('cores')} cores · "
                      f"{info.get('memory_bytes', 0) / 2**30:.1f} GiB · {info.get('os')} · "
                      f"TVM {info.get('tvm_version')}"
                      f"{' (runtime only)' if info.get('tvm_runtime_only') else ''}"
                      f"{_gpus(info)}")
    return row


def _gpus(info: dict[str, Any]) -> str:
    """The GPUs a daemon reports, as ' · NAME (sm_XX, N GiB)' each; nothing for none."""
    return "".join(f" · {g.get('name')} ({g.get('arch')}, "
                   f"{int(g.get('memory_bytes') or 0) / 2**30:.0f} GiB)"
                   for g in info.get("gpus") or [] if isinstance(g, dict))
