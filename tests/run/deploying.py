"""Helpers for tests that deploy to the session's daemon and read the JSON record back."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

from hostkit.cli import main


def daemon_inventory(write_inventory: Any, daemon: Any) -> Path:
    """An inventory whose one device, `dev`, is the session's loopback daemon."""
    return write_inventory({"devices": {"dev": {"target": {"kind": "llvm"}, "host": "127.0.0.1",
                                                "port": daemon.port}}})


def deploy_json(inv: Path, *args: str) -> tuple[int, dict[str, Any] | None, str]:
    """`edgekit deploy -d dev --json` with one quick run: exit code, record, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["deploy", "-i", str(inv), "-d", "dev", "--json", "--repeat", "1",
                     "--warmup", "0", *args])
    text = out.getvalue()
    return code, json.loads(text) if text.strip() else None, err.getvalue()
