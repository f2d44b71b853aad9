"""edgekit's device side: the RPC daemon that runs on a board.

It depends on apache-tvm and numpy only (never on torch), so that it installs on small boards.
"""

from __future__ import annotations

from importlib import metadata

__all__ = ["__version__"]

try:
    __version__ = metadata.version("edgekit")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+src"
