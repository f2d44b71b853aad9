"""Devices edgekit starts itself: the embedded local daemon and the emulated ARM board."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Protocol

from hostkit.defaults import DEFAULT_BIND
from hostkit.errors import ConnectError
from hostkit.inventory import Device

__all__ = ["Launcher", "LocalDaemon", "launcher_for", "wait_for_port_file"]


class Launcher(Protocol):
    # True when a daemon already listening at the inventory address may be used as is.
    attach_to_existing: bool

    def running(self) -> bool: ...
    def address(self) -> tuple[str, int]: ...
    def start(self) -> tuple[str, int]: ...
    def stop(self) -> None: ...


def launcher_for(device: Device) -> Launcher:
    if device.managed == "local":
        return LocalDaemon(device)
    if device.managed == "qemu-arm64":
        from hostkit.boards.emulator import EmulatedBoard

        return EmulatedBoard.for_device(device)
    raise ConnectError(f"managed: {device.managed} is not a kind edgekit can start",
                       device=device.name, stage="connect")


def wait_for_port_file(port_file: Path, proc: subprocess.Popen[bytes], timeout: float,
                       what: str, device: str, log: Path | None = None) -> int:
    """The port a daemon announced in its --port-file, or ConnectError if it died or stalled."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_file.exists():
            text = port_file.read_text(encoding="utf-8").strip()
            if text.isdigit():
                return int(text)
        if proc.poll() is not None:
            err = log.read_text(errors="replace") if log and log.exists() else ""
            tail = " | ".join(err.strip().splitlines()[-3:])
            raise ConnectError(f"{what} exited with code {proc.returncode}: {tail}",
                               device=device, stage="start")
        time.sleep(0.1)
    proc.kill()
    raise ConnectError(f"{what} did not start within {timeout:.0f}s", device=device, stage="start")


class LocalDaemon:
    """`edgekit-device serve` on this machine's loopback, on a free port, for one edgekit run."""

    attach_to_existing = True
    START_TIMEOUT_S = 60.0

    def __init__(self, device: Device) -> None:
        self.device = device
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = device.port
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def address(self) -> tuple[str, int]:
        return (DEFAULT_BIND if self.proc else self.device.host), self.port

    def start(self) -> tuple[str, int]:
        self._tmp = tempfile.TemporaryDirectory(prefix="edgekit-local-")
        port_file = Path(self._tmp.name) / "port"
        # The daemon logs every session; a file never fills up and blocks it, as a pipe would.
        self.log_path = Path(self._tmp.name) / "daemon.log"
        cmd = [sys.executable, "-m", "devicekit", "serve", "--listen", DEFAULT_BIND,
               "--port", "0", "--port-file", str(port_file), "--exit-with-parent"]
        # Port 0 lets the kernel pick a free port; TVM's server then reports the one it bound.
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=log, start_new_session=True)
        self.port = wait_for_port_file(port_file, self.proc, self.START_TIMEOUT_S,
                                       "the local edgekit-device daemon", self.device.name,
                                       self.log_path)
        return DEFAULT_BIND, self.port

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
