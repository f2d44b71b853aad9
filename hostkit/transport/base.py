"""The one transport seam: how the host reaches a device's RPC daemon.

Deploy, bench and tune see only `Transport`: open it (starting tunnels or daemons if the device
needs them), ask it for RPC sessions, hand it artifacts, close it. Whatever a transport started, it
stops on close. Sockets, paramiko and subprocesses live behind this seam and nowhere else.
"""

from __future__ import annotations

import errno
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from hostkit.errors import ConnectError, TransferError, first_line
from hostkit.inventory import Device
from hostkit.net import resolve
from hostkit.transport.relay import Relay, RelayError
from hostkit.transport.watch import LogTail, Watch

if TYPE_CHECKING:
    from tvm.rpc import RPCSession

__all__ = ["Transport", "Progress", "Notify", "connect_rpc", "watch_of"]

Progress = Callable[[int, int], None]

Notify = Callable[[str], None]  # a line for the user while edgekit waits on a device

# Seconds of silence in the RPC handshake before edgekit says it is waiting for its turn.
TURN_NOTICE_S = 2.0


def watch_of(sess: "RPCSession") -> Watch | None:
    """The watchdog edgekit put on a session it opened (None for sessions made elsewhere)."""
    return getattr(sess, "edgekit_watch", None)


def connect_rpc(device: Device, host: str, port: int, hint: str | None = None, *,
                key: str = "", notify: Notify | None = None,
                log_tail: LogTail | None = None) -> "RPCSession":
    """An RPC session to a daemon at host:port, through a relay that a `Watch` guards.

    TVM's daemon serves one session at a time and leaves the next caller's handshake unanswered
    until then: edgekit waits its turn, saying so, for up to `session_timeout` (the longest a
    session may run), then fails "busy". Every foreign error becomes one ConnectError line.
    """
    from tvm import rpc

    hint = hint or (f"is the daemon running there? try `edgekit devices` or `edgekit doctor "
                    f"--device {device.name}`")
    resolve(device, host)
    relay = open_relay(device, host, port, hint)
    outcome: dict[str, Any] = {}

    def handshake() -> None:
        try:
            outcome["sess"] = rpc.connect("127.0.0.1", relay.port, key,
                                          session_timeout=device.session_timeout)
        except Exception as exc:  # TVM raises plain RuntimeError/TVMError for every failure
            outcome["error"] = exc

    thread = threading.Thread(target=handshake, daemon=True, name=f"rpc-connect-{device.name}")
    thread.start()
    start, told = time.monotonic(), False
    while thread.is_alive():
        thread.join(0.1)
        waited = time.monotonic() - start
        if not told and waited > TURN_NOTICE_S and relay.received == 0 and notify:
            notify(f"waiting for its turn: {host}:{port} is serving another session (up to "
                   f"{device.session_timeout:g}s, session_timeout)")
            told = True
        if waited > device.session_timeout and thread.is_alive():
            relay.close()
            thread.join(5)
            raise ConnectError(f"busy: {host}:{port} accepted the connection but started no RPC "
                               f"session within {device.session_timeout:g}s (session_timeout)",
                               device=device.name, stage="connect", transient=False,
                               hint="another edgekit run or tuner holds the device, or what "
                                    "listens there is not an edgekit daemon; try again later "
                                    f"or check `edgekit doctor --device {device.name}`")
    if "error" in outcome:
        relay.close()
        failure = outcome["error"]
        if relay.peer_closed:
            tail = log_tail() if log_tail else ""
            raise ConnectError(f"{host}:{port} closed the connection during the RPC handshake"
                               + (f"; the daemon's log ends: {tail}" if tail else ""),
                               device=device.name, stage="connect", hint=hint) from failure
        raise ConnectError(f"RPC handshake with {host}:{port} failed: {first_line(failure)}",
                           device=device.name, stage="connect", hint=hint) from failure
    sess = outcome["sess"]
    sess.edgekit_watch = Watch(device.name, relay, device.stall_timeout, f"{host}:{port}",
                               log_tail, device.session_timeout)
    return sess


def open_relay(device: Device, host: str, port: int, hint: str) -> Relay:
    """A relay to host:port, or one ConnectError that says what the network answered."""
    timeout = device.connect_timeout
    try:
        return Relay(host, port, timeout, device.stall_timeout)
    except RelayError as exc:
        if exc.kind == "timeout":
            raise ConnectError(f"no answer from {host}:{port} within {timeout:g}s "
                               "(connect_timeout): the host is down or a firewall drops the "
                               "traffic", device=device.name, stage="connect",
                               hint="is the board on and on this network?") from exc
        if exc.kind == str(errno.ECONNREFUSED):
            raise ConnectError(f"connection refused at {host}:{port}: nothing listens there",
                               device=device.name, stage="connect", hint=hint) from exc
        raise ConnectError(f"cannot reach {host}:{port}: {exc}", device=device.name,
                           stage="connect", hint=hint) from exc


class Transport(ABC):
    """Reach one device; a context manager that stops whatever it started."""

    def __init__(self, device: Device) -> None:
        self.device = device
        # Set by the caller: where lines go while edgekit waits (a busy daemon's turn).
        self.notify: Notify | None = None

    def log_tail(self) -> str:
        """The last lines of the daemon's log when edgekit started it here, else ""."""
        return ""

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

        Over RPC the file travels as one message; progress comes from the session's relay.
        """
        size = path.stat().st_size
        if progress:
            progress(0, size)
        upload_name = f"{sha256}{path.suffix}"
        watch = watch_of(sess)
        stop = threading.Event()
        if watch is not None and progress is not None:
            # The file is one RPC message; the relay's count of bytes sent shows it moving.
            relay, already = watch.relay, watch.relay.sent

            def report() -> None:
                while not stop.wait(0.5):
                    progress(min(size, max(0, relay.sent - already)), size)

            threading.Thread(target=report, daemon=True, name="upload-progress").start()
        try:
            sess.upload(str(path), upload_name)
            sess.get_function("edgekit.artifact_commit")(upload_name, sha256)
        except Exception as exc:
            raise TransferError(f"upload of {path.name} ({size} bytes) failed: {first_line(exc)}",
                                device=self.device.name, stage="upload") from exc
        finally:
            stop.set()
        if progress:
            progress(size, size)

    def __enter__(self) -> "Transport":
        self.open()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
