"""`edgekit doctor`: check one device step by step; every failed step says how to fix it.

`diagnose(device)` returns data (a list of `Check`), the CLI renders it. Steps run in order:
address, TCP, then for ssh devices the login, the board's python, devicekit, TVM's version and
the daemon, then an RPC round trip (`edgekit.device_info`), then the host's toolchain for the
target. A failed step skips the steps that need it (no RPC after a refused login); the toolchain
check needs no device and always runs.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
from dataclasses import dataclass
from typing import Any

from hostkit.defaults import PROBE_TIMEOUT_S
from hostkit.errors import EdgekitError, first_line
from hostkit.inventory import Device
from hostkit.net import port_open

__all__ = ["Check", "diagnose"]

INSTALL = "run `edgekit device install --device {name}`"


@dataclass(frozen=True)
class Check:
    """One diagnostic step: what was checked, whether it passed, what was seen, how to fix it."""

    name: str
    ok: bool
    detail: str
    fix: str = ""


def _failed(name: str, exc: EdgekitError) -> Check:
    return Check(name, False, exc.message, exc.hint or "")


def diagnose(device: Device) -> list[Check]:
    """Every check for one device, in order; never raises for a problem it can describe."""
    checks: list[Check] = []
    info: dict[str, Any] | None = None
    reach = _endpoint(device)
    if reach is None:
        checks.append(Check("daemon", True, f"not running; edgekit starts it when used "
                                            f"(managed: {device.managed})"))
    elif _reachable(device, *reach, checks):
        if device.transport == "ssh":
            info = _ssh_checks(device, checks)
        else:
            info = _round_trip(device, checks)
    checks.extend(_target_checks(device, info))
    return checks


def _endpoint(device: Device) -> tuple[str, int, str] | None:
    """(host, port, what listens there) to probe; None for a managed device that is not running."""
    if device.transport == "ssh":
        return device.host, device.ssh.port, "sshd"
    if device.transport == "tracker":
        host, _, port = (device.tracker or "").rpartition(":")
        return host, int(port), "the tracker"
    if device.managed != "none":
        # A managed board's address may only exist once edgekit starts it (its own namespace).
        from hostkit.boards.launch import launcher_for

        launcher = launcher_for(device)
        if launcher.running():
            return (*launcher.address(), "the daemon")
        if not (launcher.attach_to_existing and port_open(device.host, device.port,
                                                          PROBE_TIMEOUT_S)):
            return None
    return device.host, device.port, "the daemon"


def _reachable(device: Device, host: str, port: int, what: str, checks: list[Check]) -> bool:
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = sorted({str(entry[4][0]) for entry in found})
    except OSError as exc:
        checks.append(Check("address", False, f"cannot resolve '{host}': {exc}",
                            f"check host for {device.name} in the inventory, or its DNS/mDNS name"))
        return False
    checks.append(Check("address", True, f"{host} is {', '.join(addresses)}"))
    start = time.perf_counter()
    if not port_open(host, port, device.connect_timeout):
        fixes = {"sshd": "is sshd running on the board, and is ssh.port right? a firewall?",
                 "the tracker": "is `edgekit-device tracker` running there?",
                 "the daemon": "start it on the board with `edgekit-device serve`, or use "
                               "transport: ssh so it stays on the board's loopback"}
        checks.append(Check("tcp", False, f"nothing accepts connections at {host}:{port} "
                                          f"({what})", fixes[what]))
        return False
    elapsed_ms = (time.perf_counter() - start) * 1e3
    checks.append(Check("tcp", True, f"{what} accepts connections at {host}:{port} "
                                     f"({elapsed_ms:.0f} ms)"))
    return True


def _ssh_checks(device: Device, checks: list[Check]) -> dict[str, Any] | None:
    from hostkit.transport.ssh import (
        host_tvm_version,
        probe_python,
        remote_port_open,
        remote_python_path,
    )
    from hostkit.transport.sshconn import SshConnection

    conn = SshConnection(device)
    try:
        conn.connect()
    except EdgekitError as exc:
        checks.append(_failed("ssh login", exc))
        return None
    install = INSTALL.format(name=device.name)
    with conn:
        checks.append(Check("ssh login", True, f"{conn.target}, host key verified against "
                                               f"{conn.known_hosts}"))
        try:
            remote = probe_python(conn, remote_python_path(conn))
        except EdgekitError as exc:
            checks.append(_failed("remote python", exc))
            return None
        if not remote.executable:
            checks.append(Check("remote python", False, f"{remote.path}: {remote.error}",
                                f"install python3 on the board or set ssh.python, then {install}"))
            return None
        checks.append(Check("remote python", True, f"{remote.path}: Python {remote.python} on "
                                                   f"{remote.arch} ({remote.libc})"))
        host_tvm = host_tvm_version()
        if remote.devicekit is None:
            checks.append(Check("devicekit", False, f"not importable: {remote.error}", install))
        else:
            checks.append(Check("devicekit", True, f"edgekit {remote.devicekit}"))
        tvm_ok = remote.tvm == host_tvm
        checks.append(Check("tvm version", tvm_ok, f"board {remote.tvm or 'missing'}, host "
                                                    f"{host_tvm}", "" if tvm_ok else install))
        if remote.devicekit is None or not tvm_ok:
            return None
        port = device.ssh.rpc_port
        if remote_port_open(conn, remote.path, port):
            checks.append(Check("daemon", True, f"answers on the board's 127.0.0.1:{port}"))
        else:
            checks.append(Check("daemon", True, f"not running; edgekit starts it on the "
                                                f"board's 127.0.0.1:{port} when used"))
    return _round_trip(device, checks)


def _round_trip(device: Device, checks: list[Check]) -> dict[str, Any] | None:
    """Open the device's transport and call `edgekit.device_info` through it."""
    from hostkit.transport import make_transport

    start = time.perf_counter()
    try:
        with make_transport(device) as transport:
            sess = transport.session()
            opened_s = time.perf_counter() - start
            start = time.perf_counter()
            try:
                info: dict[str, Any] = json.loads(sess.get_function("edgekit.device_info")())
                call_ms = (time.perf_counter() - start) * 1e3
            except Exception as exc:  # TVM's error for a missing function, or a dropped session
                checks.append(Check("rpc", False, f"{transport.address} answers RPC but not as an "
                                                  f"edgekit daemon: {first_line(exc)}",
                                    "start `edgekit-device serve` there"))
                return None
            del sess
    except EdgekitError as exc:
        checks.append(_failed("rpc", exc))
        return None
    checks.append(Check("rpc", True, f"device_info in {call_ms:.0f} ms (session ready in "
                                     f"{opened_s:.1f}s): {info.get('hostname')}, "
                                     f"{info.get('arch')}, {info.get('cores')} cores, "
                                     f"{info.get('os')}"))
    if device.transport != "ssh":  # for ssh the board's python was checked before connecting
        from hostkit.transport.ssh import host_tvm_version

        host_tvm, theirs = host_tvm_version(), info.get("tvm_version")
        checks.append(Check("tvm version", theirs == host_tvm, f"device {theirs}, host {host_tvm}",
                            "" if theirs == host_tvm else
                            f"install apache-tvm=={host_tvm} on the device"))
    return info


def _target_checks(device: Device, info: dict[str, Any] | None) -> list[Check]:
    from hostkit.build.targets import arch_of_triple, check_cross_compiler, resolve_target

    try:
        resolved = resolve_target(device)
    except EdgekitError as exc:
        return [_failed("target", exc)]
    checks: list[Check] = []
    if info is not None and info.get("arch"):
        board = arch_of_triple(str(info["arch"]))
        ok = board == resolved.arch
        checks.append(Check("target", ok, f"{resolved.describe()} builds for {resolved.arch}; the "
                                          f"board is {info['arch']}",
                            "" if ok else f"set the device's target to one for {info['arch']} "
                                          f"(e.g. mtriple: {board}-linux-gnu)"))
    if device.format == "tar":
        checks.append(Check("toolchain", True, "format tar: the board links the library (it "
                                               "needs a C compiler)"))
        return checks
    try:
        compiler = check_cross_compiler(device, resolved)
    except EdgekitError as exc:
        return [*checks, _failed("toolchain", exc)]
    if compiler is not None:
        import subprocess

        machine = subprocess.run([compiler, "-dumpmachine"], capture_output=True, text=True,
                                 timeout=30).stdout.strip()
        checks.append(Check("toolchain", True, f"{compiler} builds for {machine}"))
        return checks
    from tvm.support import cc

    native = cc.get_cc()
    if native is None or shutil.which(native) is None:
        checks.append(Check("toolchain", False, "no C compiler on this host to link the library",
                            "apt-get install g++ (or set CXX)"))
    else:
        checks.append(Check("toolchain", True, f"{native} (native {resolved.arch})"))
    return checks
