"""Defaults defined once: ports, bind address, timeouts, cache locations."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_BIND",
    "CONNECT_TIMEOUT_S",
    "PROBE_TIMEOUT_S",
    "SESSION_TIMEOUT_S",
    "STALL_TIMEOUT_S",
    "CONNECT_RETRIES",
    "DEFAULT_REPEAT",
    "DEFAULT_WARMUP",
    "CHECK_RTOL",
    "INVENTORY_FILE",
    "cache_dir",
]

DEFAULT_PORT = 9090
DEFAULT_BIND = "127.0.0.1"
CONNECT_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 2.0
SESSION_TIMEOUT_S = 600.0
# No progress from a device for this long fails its row, whatever the length of the work.
STALL_TIMEOUT_S = 30.0
# Extra tries of the connect stage (with backoff) before a device's rows fail.
CONNECT_RETRIES = 1
DEFAULT_REPEAT = 10
DEFAULT_WARMUP = 1
# The largest relative error vs PyTorch that counts as a match (see hostkit.run.check).
CHECK_RTOL = 1e-4
INVENTORY_FILE = "inventory.yaml"


def cache_dir() -> Path:
    """Host-side cache (artifacts, tuning records, emulated boards); EDGEKIT_CACHE overrides."""
    explicit = os.environ.get("EDGEKIT_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edgekit"
