"""`edgekit records list|export|import`: tuning records as things a user can see and move.

The helpers it shares with the other commands (inventory, model specs, consoles) live in the
package's `__init__`, imported when a command runs: that module imports this one to register it.
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.markup import escape

from hostkit.report.render import to_json

__all__ = ["cmd_records"]


def cmd_records(args: argparse.Namespace) -> int:
    return {"list": _list, "export": _export, "import": _import}[args.action](args)


def _list(args: argparse.Namespace) -> int:
    from hostkit.build.tuning.exchange import list_records
    from hostkit.cli import _console

    rows = list_records()
    if args.json:
        print(to_json(rows))
        return 0
    console = _console(args)
    if not rows:
        console.print("no tuning records yet; `edgekit tune --device D MODEL` makes them")
        return 0
    from rich.table import Table

    table = Table("model", "target", "trials", "minutes", "best ms", "records", "borrowed",
                  box=None, pad_edge=False)
    for row in rows:
        table.add_row(escape(str(row["model"])), escape(row["target"]), str(row["trials"]),
                      _figure(row["minutes"], ".1f"), _figure(row["best_ms"], ".3f"),
                      str(row["records"]),
                      f"{row['borrowed_tasks']} tasks" if row["borrowed_tasks"] else "-")
    console.print(table)
    console.print("folders: `edgekit records list --json`; move them with `edgekit records export`")
    return 0


def _figure(value: Any, spec: str) -> str:
    return "-" if value is None else format(float(value), spec)


def _export(args: argparse.Namespace) -> int:
    from hostkit.build.targets import resolve_target
    from hostkit.build.tuning.exchange import export_records
    from hostkit.build.tuning.records import records_for
    from hostkit.cli import _check_models, _console, _inventory, _specs
    from hostkit.models import load_model

    device = _inventory(args).get(args.device)
    _check_models([args.model], args.weights)
    (spec,) = _specs(args, [args.model])
    resolved = resolve_target(device)
    model = load_model(spec)
    summary = export_records(records_for(model, resolved), model.name, model.identity, resolved,
                             args.output, device.name)
    if args.json:
        print(to_json(summary))
    else:
        _console(args).print(escape(
            f"exported {summary['records']} records of {summary['model']} "
            f"({summary['target']}) to {summary['path']}; `edgekit records import "
            f"{summary['path']}` adds them on another host"))
    return 0


def _import(args: argparse.Namespace) -> int:
    from hostkit.build.targets import resolve_target
    from hostkit.build.tuning.exchange import import_records
    from hostkit.cli import _console, _inventory

    resolved, name = None, None
    if args.device:
        device = _inventory(args).get(args.device)
        resolved, name = resolve_target(device), device.name
    summary = import_records(args.file, resolved, name)
    if args.json:
        print(to_json(summary))
    else:
        _console(args).print(escape(
            f"imported records of {summary['model']} ({summary['target']}): "
            f"{summary['records']} records in {summary['path']}; deploy applies them"))
    return 0
