"""Direct RPC and RPC through a tracker; a managed device is started here if nothing answers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hostkit.boards.launch import Launcher, launcher_for
from hostkit.errors import ConnectError, first_line
from hostkit.inventory import Device
from hostkit.net import port_open, resolve
from hostkit.transport.base import Transport, connect_rpc

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
        return connect_rpc(self.device, self.host, self.port)

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
        from tvm import rpc

        host, port = self._tracker_addr()
        try:
            tracker = rpc.connect_tracker(host, port)
            return tracker.request(self.device.key, priority=1,
                                   session_timeout=self.device.session_timeout,
                                   max_retry=3)
        except Exception as exc:
            raise ConnectError(f"tracker {host}:{port} gave no device for key "
                               f"'{self.device.key}': {first_line(exc)}", device=self.device.name,
                               stage="connect",
                               hint="is a daemon registered with that key? see "
                                    "`python -m tvm.exec.query_rpc_tracker`") from exc

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
