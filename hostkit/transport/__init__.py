"""Transports: rpc (direct), tracker, ssh (RPC tunnelled over SSH). See `base.Transport`."""

from __future__ import annotations

from hostkit.inventory import Device
from hostkit.transport.base import Transport

__all__ = ["Transport", "make_transport"]


def make_transport(device: Device) -> Transport:
    """The transport the inventory names for a device (not yet opened)."""
    if device.transport == "ssh":
        from hostkit.transport.ssh import SshTransport

        return SshTransport(device)
    if device.transport == "tracker":
        from hostkit.transport.rpc import TrackerTransport

        return TrackerTransport(device)
    from hostkit.transport.rpc import RpcTransport

    return RpcTransport(device)
