"""`edgekit`: parse flags, call the library, render, map errors to exit codes.

Exit codes: 0 all ok; 1 a run failed on some device or an edgekit error; 2 bad usage.
An EdgekitError is one red line; an unexpected error is one line pointing at a debug log. Every
line edgekit writes to the terminal is one line whatever the input held (control characters are
shown escaped), and tracebacks, from edgekit or from a library's logging or warnings, go to the
debug log only. What a run needs is checked before any daemon starts: the inventory with its
targets, the device names, the model names and files.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

from rich.markup import escape

from hostkit.cli.parser import parser
from hostkit.cli.terminal import debug_log, debug_log_path, one_line, terminal, terminal_hygiene
from hostkit.defaults import INVENTORY_FILE
from hostkit.errors import EdgekitError, InventoryError, ModelError, first_line, shown
from hostkit.inventory import Device, Inventory, load_inventory, parse_inventory

__all__ = ["main"]

# Used when no inventory file is found: the embedded local device alone.
BUILTIN_INVENTORY = {"devices": {"local": {"target": {"kind": "llvm"}, "managed": "local",
                                           "description": "this machine, over loopback"}}}


def _inventory(args: argparse.Namespace) -> Inventory:
    """The inventory, checked whole, targets included, the same way for every command."""
    from hostkit.build.targets import check_inventory_targets

    if args.inventory is not None:
        inventory = load_inventory(args.inventory)
    elif os.environ.get("EDGEKIT_INVENTORY"):
        inventory = load_inventory(os.environ["EDGEKIT_INVENTORY"])
    elif os.path.isfile(INVENTORY_FILE):
        inventory = load_inventory(INVENTORY_FILE)
    else:
        inventory = parse_inventory(BUILTIN_INVENTORY)
    check_inventory_targets(inventory)
    return inventory


def _check_models(names: Sequence[str], weights: Path | None) -> None:
    """Model names and files, checked before any daemon starts or any compile begins."""
    known: list[str] | None = None
    for name in names:
        if name.endswith((".pt2", ".pt")) or os.path.isfile(name):
            if not os.path.isfile(name):
                raise ModelError(f"model file {name} not found", stage="model")
            continue
        if known is None:
            from hostkit.models import available_models

            known = available_models()
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ModelError(f"unknown model {shown(name)}: {hint}give a torchvision "
                             "classification model name or a path to a .pt2 file (`edgekit "
                             "models` lists the names)", stage="model")
    if weights is not None and not os.path.isfile(weights):
        raise ModelError(f"weights file {weights} not found", stage="model")


def _console(args: argparse.Namespace) -> Any:
    from rich.console import Console

    # With --json, stdout carries only JSON; progress and tables go to stderr. Piped output
    # gets a wide fixed width so tables stay one row per result in logs.
    console = Console(file=terminal() if getattr(args, "json", False) else None, highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 140
    return console


def _progress_console() -> Any:
    from rich.console import Console

    return Console(file=terminal(), highlight=False)


def _specs(args: argparse.Namespace, names: Sequence[str]) -> list[Any]:
    from hostkit.models import ModelSpec

    inputs = tuple(getattr(args, "input", None) or ())
    shapes = args.input_shape or []
    unnamed = [dims for name, dims in shapes if name is None]
    if len(unnamed) > 1:
        raise EdgekitError("--input-shape: give NAME=DIMS for each input of a model with "
                           "several inputs (one unnamed shape at most)")
    named = tuple((name, dims) for name, dims in shapes if name is not None)
    return [ModelSpec(name=n, weights=args.weights, input_shape=unnamed[0] if unnamed else None,
                      named_shapes=named, inputs=inputs,
                      quantize=args.quantize, calibration=args.calibration,
                      calibration_method=args.calibration_method) for n in names]


def _with_flags(device: Device, args: argparse.Namespace) -> Device:
    return device.with_overrides(format=getattr(args, "format", None))


def _run(args: argparse.Namespace, devices: list[Device], models: list[str],
         on_result: Callable[[Any], None] | None = None) -> list[Any]:
    """Run the fleet with a live status line; Ctrl-C raises FleetInterrupted with the rows."""
    from hostkit.run.deploy import RunOptions, run_fleet

    profile_runs = args.runs if args.command == "profile" else \
        (5 if getattr(args, "profile", False) else 0)
    options = RunOptions(repeat=args.repeat, warmup=args.warmup, rtol=args.rtol,
                         use_tuning=not args.no_tuning, perturb=args.perturb,
                         profile_runs=profile_runs, runtime=args.runtime,
                         baselines=args.baselines)
    specs = _specs(args, models)
    console = _progress_console()
    with console.status("starting", spinner="dots") as status:
        def step(device: str, model: str, what: str) -> None:
            label = device if model == "*" else f"{device} · {model}"
            status.update(f"[bold]{escape(label)}[/bold]: {escape(what)}")
            if not console.is_terminal:
                console.print(f"{label}: {what}", style="dim", markup=False)

        return run_fleet([_with_flags(d, args) for d in devices], specs, options, step,
                         on_result=on_result)


def cmd_deploy(args: argparse.Namespace) -> int:
    from hostkit.report.render import deploy_summary, to_json

    device = _inventory(args).get(args.device)
    _check_models([args.model], args.weights)
    (result,) = _run(args, [device], [args.model])
    if args.json:
        print(to_json(result.to_json()))
    elif result.ok or result.max_abs_diff is not None:
        deploy_summary(_console(args), result)  # a failed check still shows what was measured
    if not result.ok and not args.json:
        logs = f"; traceback in {debug_log_path()}" if result.stage == "internal" else ""
        print(one_line(f"edgekit: error: {result.device}: {result.error} (stage: {result.stage}"
                       f"{logs})"), file=terminal())
    return 0 if result.ok else 1


def _check_outputs(*paths: Path | None) -> None:
    """Refuse an output file edgekit could not write, before any work: results are never lost."""
    for path in paths:
        if path is None:
            continue
        if path.is_dir():
            raise EdgekitError(f"{path} is a folder; give a file name for the output")
        folder = path.absolute().parent
        while not folder.exists():  # missing folders are made when the file is written
            folder = folder.parent
        if not folder.is_dir():
            raise EdgekitError(f"cannot write {path}: {folder} is a file, not a folder")
        if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise EdgekitError(f"cannot write {path}: permission denied")


def _write_html(path: Path, results: Sequence[Any], title: str) -> None:
    from hostkit.report.html import html_report
    from hostkit.report.render import write_text_atomic

    write_text_atomic(path, html_report(results, title))


def cmd_profile(args: argparse.Namespace) -> int:
    from hostkit.report.render import deploy_summary, profile_table, to_json, write_profile_csv

    device = _inventory(args).get(args.device)
    _check_models([args.model], args.weights)
    _check_outputs(args.csv, args.html)
    (result,) = _run(args, [device], [args.model])
    if args.csv and result.profile:
        write_profile_csv(args.csv, result.profile)
    if args.html:
        _write_html(args.html, [result], f"edgekit profile: {result.model} on {result.device}")
    if args.json:
        print(to_json(result.to_json()))
    elif result.profile:
        profile_table(_console(args), result, None if args.all else 20)
    elif result.max_abs_diff is not None:
        deploy_summary(_console(args), result)
    if not result.ok and not args.json:
        print(f"edgekit: error: {result.device}: {result.error} (stage: {result.stage})",
              file=sys.stderr)
    return 0 if result.ok else 1


def _bench_plan(args: argparse.Namespace, inventory: Inventory) -> tuple[list[Device], list[str]]:
    """The devices and models a bench runs: from flags, or the failed rows of a results file."""
    if args.rerun_failed is not None:
        from hostkit.report.compare import failed_records

        if args.models:
            raise EdgekitError("--rerun-failed takes its models from the results file; give "
                               "no model names with it")
        failed = failed_records(args.rerun_failed)
        if not failed:
            raise EdgekitError(f"{args.rerun_failed}: every row is ok; nothing to run again")
        names = list(dict.fromkeys(str(r["device"]) for r in failed))
        models = list(dict.fromkeys(str(r.get("requested") or r["model"]) for r in failed))
        return [inventory.get(name) for name in names], models
    if args.all_devices:
        devices = list(inventory.devices.values())
    elif args.group:
        devices = inventory.group(args.group)
    elif args.device:
        devices = [inventory.get(name) for name in args.device]
    else:
        raise InventoryError("choose devices with --device NAME, --group G, --all-devices or "
                             "--rerun-failed RESULTS")
    return devices, args.models or ["resnet18"]


def cmd_bench(args: argparse.Namespace) -> int:
    from hostkit.report.render import JsonLines, bench_table, to_json, write_csv
    from hostkit.run.deploy import FleetInterrupted

    inventory = _inventory(args)
    devices, models = _bench_plan(args, inventory)
    _check_models(models, args.weights)
    _check_outputs(args.csv, args.html, args.jsonl)
    lines = JsonLines(args.jsonl) if args.jsonl else None
    interrupted = False
    try:
        results = _run(args, devices, models, lines.write if lines else None)
    except FleetInterrupted as stop:
        results, interrupted = stop.results, True
    finally:
        if lines:
            lines.close()
    if args.rerun_failed is not None:  # only the pairs that failed, not every model everywhere
        from hostkit.report.compare import failed_records

        wanted = {(r.device, r.requested) for r in results}
        failed = {(str(r["device"]), str(r.get("requested") or r["model"]))
                  for r in failed_records(args.rerun_failed)}
        results = [r for r in results if (r.device, r.requested) in failed & wanted]
    # The table comes first: whatever happens to a file, what was measured is shown.
    if args.json:
        print(to_json([r.to_json() for r in results]))
    else:
        bench_table(_console(args), results)
    problems = []
    for path, write in ((args.csv, lambda p: write_csv(p, results)),
                        (args.html, lambda p: _write_html(p, results, "edgekit bench"))):
        if path is not None:
            try:
                write(path)
            except OSError as exc:
                problems.append(f"cannot write {path}: {exc.strerror or exc}")
    for problem in problems:
        print(one_line(f"edgekit: error: {problem}"), file=terminal())
    internal = sum(r.stage == "internal" for r in results)
    if internal:
        print(f"edgekit: unexpected error in {internal} of {len(results)} runs (traceback in "
              f"{debug_log_path()}; please report it)", file=terminal())
    if interrupted:
        print("edgekit: interrupted; the table shows what finished", file=terminal())
        return 130
    return 0 if all(r.ok for r in results) and not problems else 1


def cmd_export(args: argparse.Namespace) -> int:
    from hostkit.export import export_bundle

    device = _inventory(args).get(args.device)
    _check_models([args.model], args.weights)
    (spec,) = _specs(args, [args.model])
    console = _progress_console()
    with console.status("starting", spinner="dots") as status:
        def step(what: str) -> None:
            status.update(f"[bold]{device.name} · {args.model}[/bold]: {what}")
            if not console.is_terminal:
                console.print(f"{device.name} · {args.model}: {what}", style="dim")

        bundle = export_bundle(device, spec, args.output, archive=args.archive,
                               use_tuning=not args.no_tuning, progress=step)
    if args.json:
        print(to_json_plain({"path": str(bundle.path), "archive": bundle.archive,
                             "bytes": bundle.size, "sha256": bundle.sha256,
                             "manifest": bundle.manifest}))
        return 0
    out = _console(args)
    manifest = bundle.manifest
    tuned = f"tuned ({manifest['tuned_kernels']})" if manifest["tuned"] else "untuned"
    out.print(f"[green]exported[/green] {manifest['model']['name']} for {device.name} "
              f"({manifest['arch']}, {tuned}) to {bundle.path}: {bundle.size / 1e6:.1f} MB"
              + (f", sha256 {bundle.sha256}" if bundle.sha256 else ""))
    for name, size in sorted(bundle.files.items()):
        out.print(f"  {name:<24} {size / 1e6:8.2f} MB", style="dim")
    where = f"tar xzf {bundle.path.name} && cd {bundle.path.name[:-7]}" if bundle.archive \
        else f"cd {bundle.path}"
    out.print(f"on the board: {where} && {bundle.command}")
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    from hostkit.fleet.probe import healthy, probe_all
    from hostkit.report.render import devices_table, to_json

    inventory = _inventory(args)
    rows = probe_all(list(inventory.devices.values()))
    if args.json:
        print(to_json(rows))
    else:
        devices_table(_console(args), rows)
    bad = [row["device"] for row in rows if not healthy(row)]
    if bad:
        print(one_line(f"edgekit: error: {len(bad)} of {len(rows)} devices did not answer as "
                       f"they should (unreachable, silent or another TVM): {', '.join(bad[:10])}"
                       + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")),
              file=terminal())
        return 1
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from hostkit.models.zoo import families

    groups = families()
    if args.json:
        print(json.dumps(groups, indent=2))
        return 0
    notes = {"detection": "checked detection by detection; seeded ones built with a score "
                          "threshold of 0 (see README)"}
    for family, names in groups.items():
        note = f" ({notes[family]})" if family in notes else ""
        print(f"{family}: {len(names)} models{note}")
        print("\n".join(f"  {name}" for name in names))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from hostkit.report.render import to_json
    from hostkit.run.tune import tune_on_device

    device = _inventory(args).get(args.device)
    _check_models([args.model], args.weights)
    (spec,) = _specs(args, [args.model])
    summary = tune_on_device(device, spec, trials=args.trials,
                             trials_per_task=args.trials_per_task,
                             time_budget_min=args.time_budget, console=_progress_console(),
                             winograd=args.winograd)
    if args.json:
        print(to_json(summary))
    else:
        console = _console(args)
        estimate = summary["estimated_ms"]
        console.print(
            f"[green]tuned[/green] {escape(summary['model'])} on {escape(summary['device'])}: "
            f"{summary['valid_trials']} valid trials over {summary['tasks']} tasks in "
            f"{summary['tune_s']:.0f}s"
            + (f"; sum of the best kernels {estimate:.2f} ms" if estimate is not None else "")
            + (f"; {summary['borrowed_tasks']} tasks taken from "
               + escape(", ".join(summary["borrowed_from"])) if summary["borrowed_tasks"] else "")
            + (f"; measured on {summary['boards']} boards" if summary["boards"] > 1 else "")
            + escape(f"; records in {summary['records_dir']}. "
                     f"`edgekit deploy --device {device.name} {args.model}` applies them."))
        console.print("slowest kernels (best measured, per inference):")
        for row in summary["kernels"][:5]:
            if row["best_ms"] is None:
                console.print(f"  {row['kernel']} x{row['count']}: not measured yet")
                continue
            share = row["count"] * row["best_ms"] / estimate if estimate else None
            console.print(f"  {row['kernel']} x{row['count']}: {row['best_ms']:.3f} ms"
                          + (f", {row['gflops']:.0f} GFLOP/s" if row["gflops"] else "")
                          + (f", {share:.0%} of the total" if share else ""))
    return 0


def cmd_records(args: argparse.Namespace) -> int:
    from hostkit.cli.records import records_command

    device = _inventory(args).get(args.device) if args.action != "list" and args.device else None
    spec = None
    if args.action == "export":
        _check_models([args.model], args.weights)
        (spec,) = _specs(args, [args.model])
    return records_command(args, _console(args), device, spec)


def cmd_board(args: argparse.Namespace) -> int:
    from hostkit.boards import emulator

    device = _inventory(args).get(args.device)
    if device.managed != "qemu-arm64":
        raise InventoryError(f"device '{device.name}' is not an emulated board (managed: "
                             f"{device.managed}); pick one with managed: qemu-arm64")
    console = _console(args)
    if args.action == "up":
        progress = _progress_console()
        host, port = emulator.board_up(
            device, progress=lambda line: progress.print(line, markup=False, style="dim"),
            baselines=args.baselines)
        state: dict[str, Any] = {"device": device.name, "status": "up", "address": f"{host}:{port}"}
    elif args.action == "down":
        emulator.board_down(device)
        state = {"device": device.name, "status": "down"}
    else:
        state = emulator.board_status(device)
    if args.json:
        print(to_json_plain(state))
    else:
        console.print(" · ".join(f"{k}: {v}" for k, v in state.items()), markup=False)
    return 0


def to_json_plain(data: Any) -> str:
    return json.dumps(data, indent=2, default=str)


def cmd_device(args: argparse.Namespace) -> int:
    from hostkit.fleet.provision import install_device

    device = _inventory(args).get(args.device)
    console = _progress_console()
    with console.status(f"installing devicekit on {device.name}") as status:
        summary = install_device(device,
                                 lambda what: status.update(escape(f"{device.name}: {what}")),
                                 baselines=args.baselines,
                                 runtime_only=args.runtime_only)
    if args.json:
        print(to_json_plain(dataclasses.asdict(summary)))
    else:
        _console(args).print("[green]installed[/green] "
                             + escape(f"devicekit on {device.name}: {summary}"))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from hostkit.fleet.doctor import diagnose

    device = _inventory(args).get(args.device)
    checks = diagnose(device)
    if args.json:
        print(to_json_plain([c.__dict__ for c in checks]))
    else:
        console = _console(args)
        for check in checks:
            mark = "[green]✓[/green]" if check.ok else "[red]✗[/red]"
            fix = f" [yellow]→ {escape(check.fix)}[/yellow]" if not check.ok and check.fix else ""
            console.print(f"{mark} {escape(f'{check.name}: {check.detail}')}{fix}")
    return 0 if all(c.ok for c in checks) else 1


def cmd_compare(args: argparse.Namespace) -> int:
    from hostkit.report.compare import compare_runs, load_records
    from hostkit.report.render import compare_table, to_json

    changes = compare_runs(load_records(args.old), load_records(args.new),
                           args.max_slowdown / 100)
    if args.json:
        print(to_json([{**dataclasses.asdict(c), "regressed": c.regressed} for c in changes]))
    else:
        compare_table(_console(args), changes, args.max_slowdown)
    return 1 if any(c.regressed for c in changes) else 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "deploy": cmd_deploy, "bench": cmd_bench, "export": cmd_export, "devices": cmd_devices,
    "models": cmd_models,
    "tune": cmd_tune, "board": cmd_board, "device": cmd_device, "doctor": cmd_doctor,
    "compare": cmd_compare, "profile": cmd_profile, "records": cmd_records,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    with terminal_hygiene(args.verbose):
        try:
            return COMMANDS[args.command](args)
        except EdgekitError as exc:
            print(one_line(f"edgekit: error: {exc}"), file=terminal())
            return 1
        except KeyboardInterrupt:
            print("edgekit: interrupted", file=terminal())
            return 130
        except Exception as exc:  # a bug: one line for the user, the traceback for the report
            where = debug_log(traceback.format_exc())
            saved = f"traceback in {where}" if where else "no debug log could be written"
            print(one_line(f"edgekit: unexpected error: {type(exc).__name__}: {first_line(exc)} "
                           f"({saved}; please report it)"), file=terminal())
            return 1


if __name__ == "__main__":
    sys.exit(main())
