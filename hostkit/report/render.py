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
import threading
from pathlib import Path
from typing import Any, Iterable, Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hostkit.engines import ENGINES
from hostkit.report.compare import Change
from hostkit.report.results import Baseline, RunResult

__all__ = ["deploy_summary", "bench_table", "engines_table", "devices_table", "compare_table",
           "to_json", "write_csv", "write_text_atomic", "LEGEND", "CPP_LEGEND", "BASELINE_LEGEND",
           "CSV_FIELDS"]

LEGEND = ("status: ok = ran and matched PyTorch within rtol; failed = see the error column. "
          "latency: p50/p90 over n device-timed runs (ms). rel err: max abs diff vs PyTorch over "
          "PyTorch's largest output magnitude. * = emulated board: timings are not board timings")

CPP_LEGEND = ("C++: the export bundle's runner on the device (--runtime cpp), timed by the runner "
              "itself (nearest-rank p50), checked against PyTorch like the daemon")

BASELINE_LEGEND = ("engines: the same model, weights and input run on the device in each engine, "
                   "timed like TVM and checked against PyTorch; TVM vs = TVM's p50 over the "
                   "engine's (below 1: TVM is faster); n/a = the device lacks the engine "
                   "(`edgekit device install --baselines`); a failed engine fails only its cell")

# Per baseline engine: its status, p50, relative error and TVM's ratio to it.
BASELINE_FIELDS = [f"{engine}_{what}" for engine in ENGINES
                   for what in ("status", "p50_ms", "rel_err", "tvm_ratio")]

CSV_FIELDS = ["device", "model", "target", "status", "error", "tuned", "tuned_kernels", "emulated",
              "cached", "perturbed", "max_abs_diff", "rel_err", "ref_max", "cosine", "top1_match",
              "top5_match", "compile_s", "upload_s",
              "load_s", "first_inference_ms", "memory_mb", "p50_ms", "p90_ms", "mean_ms",
              "std_ms", "n", "artifact_sha256", "cpp_p50_ms", "cpp_p90_ms", "cpp_rel_err",
              *BASELINE_FIELDS, "fastest"]


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
        gpus = "".join(f" · {g.get('name')} ({g.get('arch')})" for g in info.get("gpus") or []
                       if isinstance(g, dict))
        rows.append(("device", escape(f"{info.get('arch')} · {info.get('cores')} cores · "
                                      f"{info.get('cpu')} · {info.get('os')}{gpus}")))
    rows += [
        ("target", escape(result.target or "-")),
        ("artifact", f"{result.artifact_sha256[:16]}… ({(result.artifact_bytes or 0) / 1e6:.1f} MB"
                     f"{', cached' if result.cached else ''})" if result.artifact_sha256 else "-"),
        ("precision", _precision(result)),
        ("tuned", _tuned(result)),
        ("compile", "cached" if result.cached else _sec(result.compile_s)),
        ("upload", "already on device" if result.uploaded is False else _sec(result.upload_s)),
        ("load", _sec(result.load_s)),
        ("first inference", f"{_ms(result.first_inference_ms)} ms"),
        ("memory", _memory(result)),
    ]
    if result.max_abs_diff is not None:
        cosine = "-" if result.cosine is None else f"{result.cosine:.6f}"
        perturbed = " [yellow](self-test: one weight changed on the device)[/yellow]" \
            if result.perturbed else ""
        rows.append(("vs PyTorch", f"relative error {_diff(result.rel_err)} (max abs diff "
                                   f"{_diff(result.max_abs_diff)}, PyTorch's outputs up to "
                                   f"{_diff(result.ref_max)}), cosine {cosine}, "
                                   f"{_family_check(result)}{perturbed}"))
        if result.preprocessing:
            rows.append(("input", f"image, preprocessed: {result.preprocessing}"))
    lat = result.latency_ms
    if lat is not None:
        mark = " [yellow](emulated board: not board timings)[/yellow]" if result.emulated else ""
        rows.append(("latency", f"p50 {_ms(lat.p50)} ms · p90 {_ms(lat.p90)} ms · mean "
                                f"{_ms(lat.mean)} ± {_ms(lat.std)} ms · n={lat.n}{mark}"
                                + (f" [yellow]({result.runs_cut})[/yellow]"
                                   if result.runs_cut else "")))
    cpp = result.cpp
    if cpp is not None:
        rows.append(("C++ runner", f"bundle {cpp.bundle_bytes / 1e6:.1f} MB · load "
                                   f"{_ms(cpp.load_ms)} ms · first inference "
                                   f"{_ms(cpp.first_inference_ms)} ms · relative error "
                                   f"{_diff(cpp.rel_err)}"))
        if cpp.latency_ms is not None:
            c = cpp.latency_ms
            rows.append(("C++ latency", f"p50 {_ms(c.p50)} ms · p90 {_ms(c.p90)} ms · mean "
                                        f"{_ms(c.mean)} ± {_ms(c.std)} ms · n={c.n}"))
    for baseline in result.baselines:
        rows.append((f"{baseline.engine} on device", _baseline_line(result, baseline)))
    if result.fastest:
        rows.append(("fastest", f"[bold]{escape(result.fastest)}[/bold]"
                                + (" [yellow](emulated board)[/yellow]" if result.emulated
                                   else "")))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def _baseline_line(result: RunResult, b: Baseline) -> str:
    if b.status != "ok" or b.latency_ms is None:
        colour = "yellow" if b.status == "n/a" else "red"
        return f"[{colour}]{escape(b.cell())}[/{colour}]"
    lat = b.latency_ms
    ratio = (f" · TVM {b.tvm_ratio:.3g}x {b.engine}{'*' if b.emulated else ''}"
             if b.tvm_ratio is not None else "")
    return escape(f"p50 {_ms(lat.p50)} ms · p90 {_ms(lat.p90)} ms · n={lat.n} · relative error "
                  f"{_diff(b.rel_err)}{ratio} ({b.engine} {b.version}, {b.threads} threads)")


def _memory(result: RunResult) -> str:
    m = result.memory
    if not m:
        return "-"
    peak = (f"peak {result.memory_mb:.1f} MB above the session's idle {m['idle_rss_mb']:.0f} MB · "
            if result.memory_mb is not None and "idle_rss_mb" in m else "")
    workspace = f" · workspace {m['workspace_mb']:.1f} MB" if m.get("workspace_mb") else ""
    return (f"{peak}library {m['artifact_mb']:.1f} MB · weights {m['params_mb']:.1f} MB"
            f"{workspace}")


def _precision(result: RunResult) -> str:
    q = result.quantization
    if result.precision != "int8" or not q:
        return result.precision
    left = q.get("fp32_layers") or []
    agree = q.get("vs_fp32_top1")
    scales = (f"calibration {q['method']} on {q['samples']} samples" if q["samples"]
              else f"scales: {q['method']}")
    vnni = f" ({q['vnni_layers']} on VNNI)" if q.get("vnni_layers") else ""
    return (f"int8 ({q.get('int8_layers', q.get('layers'))} layers int8{vnni}, "
            f"{len(left)} fp32{': ' + ', '.join(left[:5]) if left else ''}) · {scales}"
            f" · weights {q['int8_mb']:.1f} MB "
            f"(fp32 {q['fp32_mb']:.1f} MB)"
            + (f" · top-1 agrees with fp32 on {agree:.0%}" if agree is not None else "")
            + _vs_source(q.get("vs_source")))


def _vs_source(source: dict[str, Any] | None) -> str:
    """A PT2E program: its int8 arithmetic next to the program as saved."""
    if not source:
        return ""
    labels = [f"{k} {'same' if source[k] else 'DIFFERENT'}" for k in ("top1", "top3")
              if k in source]
    return (f" · vs the saved program: {', '.join(labels)}, max abs diff "
            f"{source['max_abs_diff']:.3g}")


def _family_check(result: RunResult) -> str:
    check = result.check
    if check.get("family") == "segmentation" and check.get("pixel_agreement") is not None:
        return (f"{check['pixel_agreement']:.4%} of {check['pixels']:,} pixels have the same "
                "class")
    if check.get("detections") is not None:
        masks = (f", masks IoU >= {check['min_mask_iou']:.4f}"
                 if check.get("min_mask_iou") is not None else "")
        exact = (f" · against PyTorch in float64 (float32 PyTorch matched "
                 f"{check.get('float32_matched')} of {check['detections']}: a near tie "
                 "rounded the other way)"
                 if check.get("reference") == "float64" else "")
        return (f"{check['matched']} of {check['detections']} detections matched "
                f"({check['device_detections']} on the device), boxes within "
                f"{_diff(check.get('max_box_px'))} px, scores within "
                f"{_diff(check.get('max_score_diff'))}{masks}{exact}")
    top3 = check.get("top3")
    three = f", top-3 {_yes(top3)}" if top3 is not None else ""
    return f"top-1 {_yes(result.top1_match)}{three}, top-5 {_yes(result.top5_match)}"


def _yes(value: bool | None) -> str:
    return "n/a" if value is None else ("match" if value else "[red]differs[/red]")


def bench_table(console: Console, results: Sequence[RunResult]) -> None:
    table = Table(title="edgekit bench", title_justify="left")
    for name, justify in [("device", "left"), ("model", "left"), ("status", "left"),
                          ("p50 ms", "right"), ("p90 ms", "right"), ("mean ± std", "right"),
                          ("n", "right"), ("first ms", "right"), ("load", "right"), ("peak MB", "right"),
                          ("rel err", "right"), ("tuned", "left"), ("target / error", "left")]:
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    cpp = any(r.cpp is not None for r in results)
    if cpp:  # --runtime cpp: the bundle's runner beside the daemon
        table.add_column("C++ p50 ms", justify="right")
        table.add_column("C++ rel err", justify="right")
    for r in results:
        lat = r.latency_ms
        device = escape(f"{r.device}*" if r.emulated else r.device)
        tail = escape(r.target or "-") if r.ok else f"[red]{escape(r.error or '')}[/red]"
        extra = []
        if cpp:
            c_lat = r.cpp.latency_ms if r.cpp else None
            extra = [_ms(c_lat.p50 if c_lat else None), _diff(r.cpp.rel_err if r.cpp else None)]
        table.add_row(device, escape(r.model), _status(r), _ms(lat.p50 if lat else None),
                      _ms(lat.p90 if lat else None),
                      f"{_ms(lat.mean)} ± {_ms(lat.std)}" if lat else "-",
                      str(lat.n) if lat else "-", _ms(r.first_inference_ms), _sec(r.load_s),
                      "-" if r.memory_mb is None else f"{r.memory_mb:.0f}",
                      _diff(r.rel_err), "yes" if r.tuned else "no", tail, *extra)
    console.print(table)
    if any(r.baselines for r in results):
        engines_table(console, results)
    failed = sum(1 for r in results if not r.ok)
    legend = f"{LEGEND}. {CPP_LEGEND}" if cpp else LEGEND
    if any(r.baselines for r in results):
        legend = f"{legend}. {BASELINE_LEGEND}"
    console.print(f"{len(results) - failed} ok, {failed} failed. {legend}", style="dim")


def engines_table(console: Console, results: Sequence[RunResult]) -> None:
    """TVM beside each baseline engine, per device and model; the fastest engine stands out."""
    engines = list(dict.fromkeys(b.engine for r in results for b in r.baselines))
    table = Table(title="edgekit bench: engines on each device (p50 ms)", title_justify="left")
    for name, justify in [("device", "left"), ("model", "left"), ("tvm", "right"),
                          *[(e, "right") for e in engines], ("TVM vs", "left"),
                          ("fastest", "left")]:
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for r in results:
        if not r.baselines:
            continue
        by = {b.engine: b for b in r.baselines}
        tvm = _ms(r.latency_ms.p50) if r.ok and r.latency_ms else "failed"
        cells = [_standout(tvm, r.fastest == "tvm")]
        for engine in engines:
            b = by.get(engine)
            text = escape(b.cell()) if b else "-"
            if b is not None and b.status == "failed":
                text = f"[red]{text}[/red]"
            elif b is not None and b.status == "n/a":
                text = f"[yellow]{text}[/yellow]"
            cells.append(_standout(text, r.fastest == engine))
        device = escape(f"{r.device}*" if r.emulated else r.device)
        table.add_row(device, escape(r.model), *cells, escape(r.ratios() or "-"),
                      f"[bold green]{escape(r.fastest)}[/bold green]" if r.fastest else "-")
    console.print(table)


def _standout(text: str, fastest: bool) -> str:
    return f"[bold green]{text}[/bold green]" if fastest else text


PROFILE_FIELDS = ["name", "symbol", "calls", "total_ms", "mean_ms", "share", "gflops", "tuned"]


def profile_table(console: Console, result: RunResult, top: int | None) -> None:
    profile = result.profile or {}
    rows = profile.get("rows", [])
    emulated = " [yellow](emulated board: qemu timings)[/yellow]" if result.emulated else ""
    table = Table(title=f"edgekit profile: {escape(result.model)} on {escape(result.device)}, "
                        "per inference over "
                        f"{profile.get('runs')} runs{emulated}", title_justify="left")
    for name, justify in [("kernel", "left"), ("calls", "right"), ("total ms", "right"),
                          ("mean ms", "right"), ("share", "right"), ("GFLOP/s", "right"),
                          ("tuned", "left")]:
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for row in rows[:top] if top else rows:
        table.add_row(escape(row["name"]), f"{row['calls']:g}", f"{row['total_ms']:.3f}",
                      f"{row['mean_ms']:.3f}", f"{row['share']:.1%}",
                      "-" if row["gflops"] is None else f"{row['gflops']:.1f}",
                      "yes" if row["tuned"] else "no")
    console.print(table)
    shown = f"top {top} of {len(rows)} rows (--all for every row). " if top and len(rows) > top \
        else ""
    end = profile.get("end_to_end_ms")
    gap = profile.get("unaccounted")
    tail = (f"kernels sum to {profile.get('kernels_ms', 0):.2f} ms against {end:.2f} ms end to end "
            f"(p50 without timing each kernel): {abs(gap):.1%} "
            + ("not accounted for by kernels (VM dispatch, copies)" if gap >= 0 else
               "more, the cost of timing every call") if end and gap is not None else "")
    console.print(f"{shown}{tail}", style="dim")


def write_profile_csv(path: Path, profile: dict[str, Any]) -> None:
    """Every kernel row, all or nothing."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=PROFILE_FIELDS)
    writer.writeheader()
    for row in profile.get("rows", []):
        writer.writerow({k: row.get(k) for k in PROFILE_FIELDS})
    write_text_atomic(path, buffer.getvalue())


def compare_table(console: Console, changes: Sequence[Change], max_slowdown: float) -> None:
    table = Table(title="edgekit compare", title_justify="left")
    for name, justify in [("device", "left"), ("model", "left"), ("old p50", "right"),
                          ("new p50", "right"), ("change", "right"), ("noise", "right"),
                          ("verdict", "left")]:
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for c in changes:
        if c.only_in:
            verdict = f"[yellow]only in the {c.only_in} run[/yellow]"
        elif c.regressed:
            why = [f"slower by more than {max_slowdown:g}%"] if c.slower else []
            verdict = "[red]" + escape("; ".join([*why, *([c.worse_check] if c.worse_check
                                                           else [])])) + "[/red]"
        else:
            verdict = "[green]ok[/green]"
        table.add_row(escape(c.device), escape(c.model), _ms(c.old_p50), _ms(c.new_p50),
                      "-" if c.change is None else f"{c.change:+.1%}",
                      "-" if c.noise_ms is None else f"±{c.noise_ms:.2f}", verdict)
    console.print(table)
    bad = sum(1 for c in changes if c.regressed)
    console.print(f"{bad} regressed of {len(changes)}. A row regresses when its p50 grew by more "
                  f"than {max_slowdown:g}% and by more than the noise (twice the standard error "
                  "of the difference), or its check against PyTorch got worse.", style="dim")


def devices_table(console: Console, rows: Iterable[dict[str, Any]]) -> None:
    table = Table(title="edgekit devices", title_justify="left")
    for name in ("device", "transport", "address", "target", "groups", "status", "reports"):
        table.add_column(name, overflow="fold")
    for row in rows:
        colour = {"reachable": "green", "on demand": "yellow"}.get(row["status"], "red")
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
    cpp = row.pop("cpp") or {}
    cpp_lat = cpp.get("latency_ms") or {}
    row.update({"cpp_p50_ms": cpp_lat.get("p50"), "cpp_p90_ms": cpp_lat.get("p90"),
                "cpp_rel_err": cpp.get("rel_err")})
    for b in r.baselines:
        row.update({f"{b.engine}_status": b.status,
                    f"{b.engine}_p50_ms": b.latency_ms.p50 if b.latency_ms else None,
                    f"{b.engine}_rel_err": b.rel_err, f"{b.engine}_tvm_ratio": b.tvm_ratio})
    return {k: row.get(k) for k in CSV_FIELDS}


def write_csv(path: Path, results: Sequence[RunResult]) -> None:
    """Write all rows or nothing: a temporary file renamed into place."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for r in results:
        writer.writerow(_csv_row(r))
    write_text_atomic(path, buffer.getvalue())


class JsonLines:
    """`--jsonl FILE`: one record per line, written and flushed the moment a row is final, so a
    host that dies mid-fleet keeps every row already measured."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(path, "w", encoding="utf-8")
        self.lock = threading.Lock()

    def write(self, result: RunResult) -> None:
        with self.lock:
            if not self.handle.closed:
                self.handle.write(json.dumps(result.to_json(), default=str) + "\n")
                self.handle.flush()

    def close(self) -> None:
        with self.lock:
            self.handle.close()


def write_text_atomic(path: Path, text: str) -> None:
    """Write all of `text` or nothing: a temporary file renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; a report is as readable as any file
    os.replace(tmp, path)
