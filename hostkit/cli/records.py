"""`edgekit records list|export|import`: tuning records as things a user can see and move.

The package's `__init__` reads the inventory, the model spec and the console the way every other
command does, and hands them here; this module imports nothing of the CLI's own.
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.markup import escape

from hostkit.inventory import Device
from hostkit.models import ModelSpec
from hostkit.report.render import to_json

__all__ = ["records_command"]


def records_command(args: argparse.Namespace, console: Any, device: Device | None,
                    spec: ModelSpec | None) -> int:
    """`device` is the one `--device` names (if any); `spec` the model `export` names."""
    if args.action == "export":
        assert device is not None and spec is not None  # the parser requires both
        return _export(args, console, device, spec)
    if args.action == "import":
        return _import(args, console, device)
    return _list(args, console)


def _list(args: argparse.Namespace, console: Any) -> int:
    from hostkit.build.tuning.exchange import list_records
    from hostkit.build.tuning.records import WINOGRAD

    rows = list_records()
    if args.json:
        print(to_json(rows))
        return 0
    if not rows:
        console.print("no tuning records yet; `edgekit tune --device D MODEL` makes them")
        return 0
    from rich.table import Table

    table = Table("model", "target", "trials", "minutes", "best ms", "records", "borrowed",
                  box=None, pad_edge=False)
    for row in rows:
        model = str(row["model"]) + (" (winograd)" if row["preparation"] == WINOGRAD else "")
        table.add_row(escape(model), escape(row["target"]), str(row["trials"]),
                      _figure(row["minutes"], ".1f"), _figure(row["best_ms"], ".3f"),
                      str(row["records"]),
                      f"{row['borrowed_tasks']} tasks" if row["borrowed_tasks"] else "-")
    console.print(table)
    console.print("folders: `edgekit records list --json`; move them with `edgekit records export`")
    return 0


def _figure(value: Any, spec: str) -> str:
    return "-" if value is None else format(float(value), spec)


def _export(args: argparse.Namespace, console: Any, device: Device, spec: ModelSpec) -> int:
    from hostkit.build.targets import resolve_target
    from hostkit.build.tuning.exchange import export_records
    from hostkit.build.tuning.records import records_for
    from hostkit.models import load_model

    resolved = resolve_target(device)
    model = load_model(spec)
    summary = export_records(records_for(model, resolved), model.name, model.identity, resolved,
                             args.output, device.name)
    if args.json:
        print(to_json(summary))
    else:
        console.print(escape(
            f"exported {summary['records']} records of {summary['model']} "
            f"({summary['target']}) to {summary['path']}; `edgekit records import "
            f"{summary['path']}` adds them on another host"))
    return 0


def _import(args: argparse.Namespace, console: Any, device: Device | None) -> int:
    from hostkit.build.targets import resolve_target
    from hostkit.build.tuning.exchange import import_records

    resolved, name = None, None
    if device is not None:
        resolved, name = resolve_target(device), device.name
    summary = import_records(args.file, resolved, name)
    if args.json:
        print(to_json(summary))
    else:
        console.print(escape(
            f"imported records of {summary['model']} ({summary['target']}): "
            f"{summary['records']} records in {summary['path']}; deploy applies them"))
    return 0
