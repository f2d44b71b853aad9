"""Rendering: result records to rich tables, JSON and CSV. No logic that decides anything.

Every value that comes from the user, a device or an error is escaped before rich reads it, so a
device named `[/x]` is shown as written instead of being read as markup.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hostkit.report.results import RunResult

__all__ = ["deploy_summary", "bench_table", "devices_table", "to_json", "write_csv", "LEGEND",
           "CSV_FIELDS"]

LEGEND = ("status: ok = ran and matched PyTorch within rtol; failed = see the error column. "
          "latency: p50/p90 over n device-timed runs (ms). rel err: max abs diff vs PyTorch over "
          "PyTorch's largest output magnitude. * = emulated board: timings are not board timings")

CSV_FIELDS = ["device", "model", "target", "status", "error", "tuned", "tuned_kernels", "emulated",
              "cached", "perturbed", "max_abs_diff", "rel_err", "ref_max", "cosine", "top1_match",
              "top5_match", "compile_s", "upload_s",
              "load_s", "first_inference_ms", "p50_ms", "p90_ms", "mean_ms", "std_ms", "n",
              "artifact_sha256"]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}"


def _sec(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def _diff(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def _status(result: RunResult) -> str:
    return "[green]ok[/green]" if result.ok else "[red]failed[/red]"


def deploy_summary(console: Console, result: RunResult) -> None:
    table = Table(title=f"edgekit deploy: {escape(result.model)} on {escape(result.device)}",
                  show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    info = result.device_info
    rows: list[tuple[str, str]] = [("status", _status(result))]
    if result.error:
        rows.append(("error", f"[red]{escape(result.error)}[/red] (stage: {result.stage})"))
    if info:
        rows.append(("device", escape(f"{info.get('arch')} · {info.get('cores')} cores · "
                                      f"{info.get('cpu')} · {info.get('os')}")))
    rows += [
        ("target", escape(result.target or "-")),
        ("artifact", f"{result.artifact_sha256[:16]}… ({(result.artifact_bytes or 0) / 1e6:.1f} MB"
                     f"{', cached' if result.cached else ''})" if result.artifact_sha256 else "-"),
        ("tuned", _tuned(result)),
        ("compile", "cached" if result.cached else _sec(result.compile_s)),
        ("upload", "already on device" if result.uploaded is False else _sec(result.upload_s)),
        ("load", _sec(result.load_s)),
        ("first inference", f"{_ms(result.first_inference_ms)} ms"),
    ]
    if result.max_abs_diff is not None:
        cosine = "-" if result.cosine is None else f"{result.cosine:.6f}"
        perturbed = " [yellow](self-test: one weight changed on the device)[/yellow]" \
            if result.perturbed else ""
        rows.append(("vs PyTorch", f"relative error {_diff(result.rel_err)} (max abs diff "
                                   f"{_diff(result.max_abs_diff)}, PyTorch's outputs up to "
                                   f"{_diff(result.ref_max)}), cosine {cosine}, top-1 "
                                   f"{_yes(result.top1_match)}, top-5 {_yes(result.top5_match)}"
                                   f"{perturbed}"))
    lat = result.latency_ms
    if lat is not None:
        mark = " [yellow](emulated board: not board timings)[/yellow]" if result.emulated else ""
        rows.append(("latency", f"p50 {_ms(lat.p50)} ms · p90 {_ms(lat.p90)} ms · mean "
                                f"{_ms(lat.mean)} ± {_ms(lat.std)} ms · n={lat.n}{mark}"))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def _yes(value: bool | None) -> str:
    return "n/a" if value is None else ("match" if value else "[red]differs[/red]")


def bench_table(console: Console, results: Sequence[RunResult]) -> None:
    table = Table(title="edgekit bench", title_justify="left")
    for name, justify in [("device", "left"), ("model", "left"), ("status", "left"),
                          ("p50 ms", "right"), ("p90 ms", "right"), ("mean ± std", "right"),
                          ("n", "right"), ("first ms", "right"), ("load", "right"),
                          ("rel err", "right"), ("tuned", "left"), ("target / error", "left")]:
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for r in results:
        lat = r.latency_ms
        device = escape(f"{r.device}*" if r.emulated else r.device)
        tail = escape(r.target or "-") if r.ok else f"[red]{escape(r.error or '')}[/red]"
        table.add_row(device, escape(r.model), _status(r), _ms(lat.p50 if lat else None),
                      _ms(lat.p90 if lat else None),
                      f"{_ms(lat.mean)} ± {_ms(lat.std)}" if lat else "-",
                      str(lat.n) if lat else "-", _ms(r.first_inference_ms), _sec(r.load_s),
                      _diff(r.rel_err), "yes" if r.tuned else "no", tail)
    console.print(table)
    failed = sum(1 for r in results if not r.ok)
    console.print(f"{len(results) - failed} ok, {failed} failed. {LEGEND}", style="dim")


def devices_table(console: Console, rows: Iterable[dict[str, Any]]) -> None:
    table = Table(title="edgekit devices", title_justify="left")
    for name in ("device", "transport", "address", "target", "groups", "status", "reports"):
        table.add_column(name, overflow="fold")
    for row in rows:
        colour = {"reachable": "green", "unreachable": "red"}.get(row["status"], "yellow")
        table.add_row(escape(row["device"]), row["transport"], escape(row["address"]),
                      escape(row["target"]), escape(", ".join(row["groups"]) or "-"),
                      f"[{colour}]{row['status']}[/{colour}]", escape(row["reports"]))
    console.print(table)


def _tuned(result: RunResult) -> str:
    if not result.tuned:
        return "no"
    kernels = f"{result.tuned_kernels} kernels, " if result.tuned_kernels else ""
    return f"yes ({kernels}records {escape(result.records or '-')})"


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, default=str)


def _csv_row(r: RunResult) -> dict[str, Any]:
    row = r.to_json()
    lat = row.pop("latency_ms") or {}
    row.update({"p50_ms": lat.get("p50"), "p90_ms": lat.get("p90"), "mean_ms": lat.get("mean"),
                "std_ms": lat.get("std"), "n": lat.get("n")})
    return {k: row.get(k) for k in CSV_FIELDS}


def write_csv(path: Path, results: Sequence[RunResult]) -> None:
    """Write all rows or nothing: a temporary file renamed into place."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for r in results:
        writer.writerow(_csv_row(r))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
        handle.write(buffer.getvalue())
    os.replace(tmp, path)
