"""The two socket checks every layer makes before it speaks RPC: does the name resolve, does the
port accept. They live below the transports and the boards, which both need them."""

from __future__ import annotations

import socket

from hostkit.errors import ConnectError
from hostkit.inventory import Device

__all__ = ["port_open", "resolve"]


def port_open(host: str, port: int, timeout: float) -> bool:
    """True when something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve(device: Device, host: str) -> None:
    """ConnectError unless the host name resolves: a typo should not read as a dead board."""
    try:
        socket.getaddrinfo(host, None)
    except OSError as exc:
        raise ConnectError(f"cannot resolve host {host}", device=device.name, stage="connect",
                           hint="check the host in the inventory, or use an IP address") from exc
