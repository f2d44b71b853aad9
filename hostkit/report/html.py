"""One self-contained HTML page of results, for people who would rather look than read.

No script, font or stylesheet is fetched: the styles are inline and the charts are SVG drawn
here, so the page opens the same on a laptop with no network. It holds the results table, a bar
chart of p50 latency per device and model, with `--baselines` a bar chart of each engine's p50,
and for every result with a profile a bar chart of its slowest kernels. Everything shown is
escaped: device names and errors come from outside.
"""

from __future__ import annotations

import html
import time
from typing import Sequence

from hostkit import __version__
from hostkit.report.results import RunResult

__all__ = ["html_report"]

BAR_HEIGHT = 22
CHART_WIDTH = 760
LABEL_WIDTH = 300
TOP_KERNELS = 15
STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 2em; }
table { border-collapse: collapse; } th, td { padding: 4px 10px; border-bottom: 1px solid #ddd; }
th { text-align: left; background: #f4f4f4; white-space: nowrap; }
td.num { text-align: right; white-space: nowrap; }
.ok { color: #1a7f37; font-weight: 600; } .failed { color: #cf222e; font-weight: 600; }
.note { color: #666; font-size: 12px; }
"""


def html_report(results: Sequence[RunResult], title: str) -> str:
    """The page for `results`: a table, the latency chart, and each profile's chart."""
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p class='note'>edgekit {html.escape(__version__)}, "
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}. Latency is timed on the device; * marks an "
             "emulated board (qemu timings, not the board's).</p>",
             _table(results)]
    bars = [(_label(r), r.latency_ms.p50) for r in results if r.ok and r.latency_ms]
    if bars:
        parts += ["<h2>p50 latency (ms)</h2>", _bar_chart(bars, "ms")]
    engines = [(f"{_label(r)} · {name}", p50) for r in results if r.baselines
               for name, p50 in _engine_p50s(r)]
    if engines:
        parts += ["<h2>Engines on each device: p50 (ms) of TVM and the baselines that matched "
                  "PyTorch</h2>", _bar_chart(engines, "ms")]
    for r in results:
        rows = (r.profile or {}).get("rows") or []
        if rows:
            top = [(row["name"], row["total_ms"]) for row in rows[:TOP_KERNELS]]
            parts += [f"<h2>Where the time goes: {html.escape(_label(r))} (ms per inference, "
                      f"top {len(top)} of {len(rows)} kernels)</h2>", _bar_chart(top, "ms")]
    parts.append("</body></html>")
    return "\n".join(parts)


def _engine_p50s(r: RunResult) -> list[tuple[str, float]]:
    """TVM's p50 and each baseline's that ran and matched (`--baselines`), fastest marked."""
    p50s = [("tvm", r.latency_ms.p50)] if r.ok and r.latency_ms else []
    p50s += [(b.engine, b.latency_ms.p50) for b in r.baselines
             if b.status == "ok" and b.latency_ms is not None]
    return [(f"{name} (fastest)" if name == r.fastest else name, p50) for name, p50 in p50s]


def _label(r: RunResult) -> str:
    return f"{r.device}{'*' if r.emulated else ''} · {r.model}"


def _table(results: Sequence[RunResult]) -> str:
    head = ["device", "model", "status", "p50 ms", "p90 ms", "n", "rel err", "peak MB",
            "target / error"]
    rows = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for r in results:
        lat = r.latency_ms
        cells = [
            html.escape(f"{r.device}{'*' if r.emulated else ''}"), html.escape(r.model),
            f"<span class='{'ok' if r.ok else 'failed'}'>{'ok' if r.ok else 'failed'}</span>",
            _num(lat.p50 if lat else None), _num(lat.p90 if lat else None),
            str(lat.n) if lat else "-",
            "-" if r.rel_err is None else f"{r.rel_err:.2e}",
            _num(r.memory_mb), html.escape((r.target or "-") if r.ok else (r.error or "")),
        ]
        rows.append("<tr>" + "".join(
            f"<td class='num'>{c}</td>" if i in (3, 4, 5, 6, 7) else f"<td>{c}</td>"
            for i, c in enumerate(cells)) + "</tr>")
    rows.append("</table>")
    return "\n".join(rows)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}"


def _bar_chart(bars: list[tuple[str, float]], unit: str) -> str:
    """Horizontal bars, longest first as given, each labelled with its value."""
    peak = max((value for _, value in bars), default=0.0) or 1.0
    span = CHART_WIDTH - LABEL_WIDTH - 90
    height = BAR_HEIGHT * len(bars) + 10
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{CHART_WIDTH}' height='{height}' "
           f"role='img'>"]
    for i, (label, value) in enumerate(bars):
        y = 5 + i * BAR_HEIGHT
        width = max(1.0, span * value / peak)
        text = label if len(label) <= 46 else label[:45] + "…"
        out.append(f"<text x='{LABEL_WIDTH - 8}' y='{y + 15}' text-anchor='end' font-size='12'>"
                   f"{html.escape(text)}</text>")
        out.append(f"<rect x='{LABEL_WIDTH}' y='{y + 3}' width='{width:.1f}' height='"
                   f"{BAR_HEIGHT - 6}' fill='#4f7bd9'/>")
        out.append(f"<text x='{LABEL_WIDTH + width + 6:.1f}' y='{y + 15}' font-size='12'>"
                   f"{value:,.2f} {unit}</text>")
    out.append("</svg>")
    return "".join(out)
