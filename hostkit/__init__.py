"""edgekit's host library: inventory, compile, ship, run, check and benchmark models on boards.

Importing it does nothing: TVM and torch are imported only by the functions that need them, so
`edgekit --help` and inventory checks stay fast.
"""

from __future__ import annotations

from importlib import metadata

__all__ = ["__version__"]

try:
    __version__ = metadata.version("edgekit")
except metadata.PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0.0.0+src"
