"""The one transport seam: how the host reaches a device's RPC daemon.

Deploy, bench and tune see only `Transport`: open it (starting tunnels or daemons if the device
needs them), ask it for RPC sessions, hand it artifacts, close it. Whatever a transport started, it
stops on close. Sockets, paramiko and subprocesses live behind this seam and nowhere else.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from hostkit.errors import ConnectError, TransferError, first_line
from hostkit.inventory import Device
from hostkit.net import port_open, resolve

if TYPE_CHECKING:
    from tvm.rpc import RPCSession

__all__ = ["Transport", "Progress", "connect_rpc"]

Progress = Callable[[int, int], None]

# Extra seconds a busy daemon gets to finish its current session before edgekit gives up.
BUSY_GRACE_S = 20.0


def connect_rpc(device: Device, host: str, port: int, hint: str | None = None) -> "RPCSession":
    """An RPC session to a daemon at host:port, with TVM's errors mapped to ConnectError."""
    from tvm import rpc

    hint = hint or f"is the daemon running there? try `edgekit devices` or `edgekit doctor --device {device.name}`"
    resolve(device, host)
    if not port_open(host, port, device.connect_timeout):
        raise ConnectError(f"cannot reach {host}:{port}", device=device.name, stage="connect",
                           hint=hint)
    # TVM's daemon serves one session at a time and its handshake blocks while another session
    # is open, so the handshake runs in a thread and a busy device becomes an error, not a hang.
    outcome: dict[str, Any] = {}

    def handshake() -> None:
        try:
            outcome["sess"] = rpc.connect(host, port, session_timeout=device.session_timeout)
        except Exception as exc:  # TVM raises plain RuntimeError/TVMError for every failure
            outcome["error"] = exc

    thread = threading.Thread(target=handshake, daemon=True, name=f"rpc-connect-{device.name}")
    thread.start()
    thread.join(device.connect_timeout + BUSY_GRACE_S)
    if thread.is_alive():
        raise ConnectError(f"{host}:{port} accepted the connection but no RPC session started "
                           f"within {device.connect_timeout + BUSY_GRACE_S:.0f}s", device=device.name,
                           stage="connect", hint="the daemon serves one session at a time: is "
                           "another edgekit run or tuner using this device?")
    if "error" in outcome:
        failure = outcome["error"]
        raise ConnectError(f"RPC handshake with {host}:{port} failed: {first_line(failure)}",
                           device=device.name, stage="connect", hint=hint) from failure
    return outcome["sess"]


class Transport(ABC):
    """Reach one device; a context manager that stops whatever it started."""

    def __init__(self, device: Device) -> None:
        self.device = device

    @abstractmethod
    def open(self) -> None:
        """Make the device's daemon reachable (start tunnels or a managed daemon if needed)."""

    @abstractmethod
    def session(self) -> "RPCSession":
        """A new RPC session with the daemon."""

    def close(self) -> None:
        """Stop what `open` started."""

    def boards(self) -> int:
        """How many identical boards answer for this device (a tracker's key may have several)."""
        return 1

    @property
    def address(self) -> str:
        return self.device.address

    def put_artifact(self, sess: "RPCSession", path: Path, sha256: str,
                     progress: Progress | None = None) -> None:
        """Send an artifact into the device's store; the device checks its hash before keeping it.

        Over RPC the file travels as one message, so progress is reported at start and end.
        """
        size = path.stat().st_size
        if progress:
            progress(0, size)
        upload_name = f"{sha256}{path.suffix}"
        try:
            sess.upload(str(path), upload_name)
            sess.get_function("edgekit.artifact_commit")(upload_name, sha256)
        except Exception as exc:
            raise TransferError(f"upload of {path.name} ({size} bytes) failed: {first_line(exc)}",
                                device=self.device.name, stage="upload") from exc
        if progress:
            progress(size, size)

    def __enter__(self) -> "Transport":
        self.open()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
