"""Direct RPC and RPC through a tracker; a managed device is started here if nothing answers."""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from hostkit.boards.launch import Launcher, launcher_for
from hostkit.errors import ConnectError, first_line
from hostkit.inventory import Device
from hostkit.net import port_open, resolve
from hostkit.transport.base import TURN_NOTICE_S, Transport, connect_rpc

if TYPE_CHECKING:
    from tvm.rpc import RPCSession

__all__ = ["RpcTransport", "TrackerTransport"]


class RpcTransport(Transport):
    """A daemon listening at host:port; for a managed device, one edgekit starts when needed."""

    def __init__(self, device: Device) -> None:
        super().__init__(device)
        self.host, self.port = device.host, device.port
        self._launcher: Launcher | None = None

    def open(self) -> None:
        if self.device.managed == "none":
            return
        from hostkit.defaults import PROBE_TIMEOUT_S

        launcher = launcher_for(self.device)
        if launcher.running() or (launcher.attach_to_existing
                                  and port_open(self.host, self.port, PROBE_TIMEOUT_S)):
            self.host, self.port = launcher.address()
            return
        self.host, self.port = launcher.start()
        self._launcher = launcher

    @property
    def address(self) -> str:
        started = " (started by edgekit)" if self._launcher else ""
        return f"{self.host}:{self.port}{started}"

    def session(self) -> "RPCSession":
        return connect_rpc(self.device, self.host, self.port, notify=self.notify,
                           log_tail=self.log_tail)

    def log_tail(self) -> str:
        """The last lines of the log of a daemon this transport started."""
        path = getattr(self._launcher, "log_path", None)
        if path is None or not Path(path).is_file():
            return ""
        lines = [line.strip() for line in Path(path).read_text(errors="replace").splitlines()]
        return " | ".join([line for line in lines if line][-3:])

    def close(self) -> None:
        if self._launcher is not None:
            self._launcher.stop()
            self._launcher = None


class TrackerTransport(Transport):
    """Ask a TVM RPC tracker for any free daemon registered under the device's key."""

    def open(self) -> None:
        host, port = self._tracker_addr()
        resolve(self.device, host)
        if not port_open(host, port, self.device.connect_timeout):
            raise ConnectError(f"cannot reach tracker {host}:{port}", device=self.device.name,
                               stage="connect", hint="is `edgekit-device tracker` running there?")

    def _tracker_addr(self) -> tuple[str, int]:
        assert self.device.tracker is not None  # the inventory guarantees it for this transport
        host, _, port = self.device.tracker.rpartition(":")
        return host, int(port)

    def session(self) -> "RPCSession":
        """Ask the tracker for a free daemon (waiting, bounded, while all are busy), then
        connect to it like any daemon, through a watched relay."""
        host, port = self._tracker_addr()
        url, daemon_port, matchkey = self._request(host, port)
        return connect_rpc(self.device, url, daemon_port, key=matchkey, notify=self.notify,
                           hint=f"the tracker {host}:{port} handed out {url}:{daemon_port}; is "
                                "that daemon still up?")

    def _request(self, host: str, port: int) -> tuple[str, int, str]:
        from tvm.rpc import base

        device, waited = self.device, self.device.session_timeout
        where = f"tracker {host}:{port}"
        try:
            sock = socket.create_connection((host, port), timeout=device.connect_timeout)
        except OSError as exc:
            raise ConnectError(f"cannot reach {where}: {exc.strerror or first_line(exc)}",
                               device=device.name, stage="connect",
                               hint="is `edgekit-device tracker` running there?") from exc
        try:
            sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            if struct.unpack("<i", base.recvall(sock, 4))[0] != base.RPC_TRACKER_MAGIC:
                raise ConnectError(f"{where} is not a TVM RPC tracker", device=device.name,
                                   stage="connect", hint="check `tracker:` in the inventory")
            base.sendjson(sock, [base.TrackerCode.REQUEST, device.key, "", 1])
            sock.settimeout(TURN_NOTICE_S)
            try:
                value = base.recvjson(sock)
            except (socket.timeout, TimeoutError):
                if self.notify:
                    self.notify(f"waiting for a free '{device.key}' device from {where} (up to "
                                f"{waited:g}s, session_timeout)")
                sock.settimeout(waited)
                value = base.recvjson(sock)
        except (socket.timeout, TimeoutError) as exc:
            raise ConnectError(f"busy: {where} had no free device for key '{device.key}' "
                               f"within {waited:g}s (session_timeout)", device=device.name,
                               stage="connect", transient=False, hint="every daemon with that key is in use or "
                               "none is registered; see `python -m tvm.exec.query_rpc_tracker`"
                               ) from exc
        except (OSError, ValueError, struct.error) as exc:
            raise ConnectError(f"{where} broke off the request for key '{device.key}': "
                               f"{first_line(exc)}", device=device.name, stage="connect",
                               hint="is the tracker still running?") from exc
        finally:
            sock.close()
        if not (isinstance(value, list) and value and value[0] == base.TrackerCode.SUCCESS):
            raise ConnectError(f"{where} refused the request for key '{device.key}': {value!r}",
                               device=device.name, stage="connect")
        url, daemon_port, matchkey = value[1]
        return str(url), int(daemon_port), str(matchkey)

    def boards(self) -> int:
        """The daemons registered under the device's key, busy or free (at least 1)."""
        from tvm import rpc

        host, port = self._tracker_addr()
        try:
            summary = rpc.connect_tracker(host, port).summary()
        except Exception as exc:
            raise ConnectError(f"tracker {host}:{port} did not say which daemons it has: "
                               f"{first_line(exc)}", device=self.device.name,
                               stage="connect") from exc
        wanted = f"server:{self.device.key}"
        return max(1, sum(1 for server in summary.get("server_info", [])
                          if server.get("key") == wanted))
