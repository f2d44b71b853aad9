"""edgekit's exceptions: one root, a shallow tree, one clear line each.

    EdgekitError                 every error a user can cause or fix; the CLI prints str(exc)
    ├── InventoryError           inventory.yaml: missing file, unknown key, wrong type, duplicate
    ├── TargetError              a target tag or dict TVM rejects; a missing cross compiler
    ├── ModelError               unknown model name, unreadable weights or .pt2 file
    ├── CompileError             import to Relax (unsupported operator) or compilation failed
    ├── ConnectError             the device cannot be reached, or its TVM does not match
    ├── TransferError            an artifact did not reach the device intact
    ├── RemoteError              loading or running on the device failed
    ├── TuneError                tuning found no valid candidate, or its records are unusable
    └── ExportError              a bundle cannot be made: its folder, the runtime, the runner

Foreign exceptions (TVM, torch, paramiko, sockets) are mapped at the seam that calls them,
always with `raise ... from exc`, so the cause stays in the debug log.
"""

from __future__ import annotations

import reprlib
from typing import Any

__all__ = [
    "EdgekitError",
    "InventoryError",
    "TargetError",
    "ModelError",
    "CompileError",
    "ConnectError",
    "TransferError",
    "RemoteError",
    "TuneError",
    "ExportError",
    "first_line",
    "device_part",
    "shown",
]


class EdgekitError(Exception):
    """An error edgekit explains in one line; `device` and `stage` say where it happened."""

    def __init__(self, message: str, *, device: str | None = None, stage: str | None = None,
                 hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.device = device
        self.stage = stage
        self.hint = hint

    def __str__(self) -> str:
        where = f"{self.device}: " if self.device else ""
        hint = f" ({self.hint})" if self.hint else ""
        return f"{where}{self.message}{hint}"


class InventoryError(EdgekitError):
    """inventory.yaml: missing file, unknown key, wrong type, duplicate."""


class TargetError(EdgekitError):
    """A target TVM rejects, or a missing or wrong cross compiler."""


class ModelError(EdgekitError):
    """An unknown model name, or an unreadable weights or .pt2 file."""


class CompileError(EdgekitError):
    """Import to Relax (an unsupported operator) or compilation failed."""


class ConnectError(EdgekitError):
    """The device cannot be reached, or its TVM version does not match.

    `transient` says whether trying again later may help (a refused or timed-out connection);
    a version mismatch, a foreign daemon or a turn already waited for in vain will not change.
    """

    def __init__(self, message: str, *, device: str | None = None, stage: str | None = None,
                 hint: str | None = None, transient: bool = True) -> None:
        super().__init__(message, device=device, stage=stage, hint=hint)
        self.transient = transient


class TransferError(EdgekitError):
    """An artifact did not reach the device intact."""


class RemoteError(EdgekitError):
    """Loading or running on the device failed, or outputs differ from PyTorch."""


class TuneError(EdgekitError):
    """Tuning found no valid candidate, or its records are unusable."""


class ExportError(EdgekitError):
    """A bundle cannot be made: its output folder, the TVM runtime for the device, the runner."""


# TVM's RPC client puts this line above the device's own error text.
_RPC_WRAPPER = "Error caught from RPC call"


def first_line(exc: BaseException) -> str:
    """The line of a foreign exception's text that names the error, shortened for one line.

    An RPC error is TVM's wrapper line followed by what the device raised; the line is taken from
    the device's part, which names the cause (the wrapper alone says nothing).
    """
    lines = device_part([line.strip() for line in str(exc).splitlines() if line.strip()])
    errors = [line for line in lines if "Error" in line]
    return (errors[-1] if errors else lines[-1] if lines else type(exc).__name__)[:300]


def device_part(lines: list[str]) -> list[str]:
    """The lines below TVM's last RPC wrapper line (what the device raised), else all of them."""
    wrapper = [i for i, line in enumerate(lines) if _RPC_WRAPPER in line]
    return lines[wrapper[-1] + 1:] if wrapper and wrapper[-1] + 1 < len(lines) else lines


# Quoted values are cut to a few dozen characters: a message stays one short line, whatever the
# input held.
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 60
_REPR.maxlevel = 3


def shown(value: Any) -> str:
    """A value as an error message quotes it: repr, shortened, on one line whatever it holds."""
    return _REPR.repr(value)
