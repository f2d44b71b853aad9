"""The regression gate: two runs' `--json` records, compared per (device, model).

A row is slower when its p50 grew by more than `max_slowdown` (a fraction) and by more than the
noise of the two runs: twice the standard error of the difference of their means, from each run's
std and n. Noise alone never fails a gate, and neither does a change below the threshold, however
certain. A row's check got worse when it went from ok to failed, or its relative error grew past
the check's tolerance. Rows present in only one run are listed, not judged.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hostkit.defaults import CHECK_RTOL
from hostkit.errors import EdgekitError

__all__ = ["Change", "compare_runs", "failed_records", "load_records", "MAX_SLOWDOWN"]

MAX_SLOWDOWN = 0.10


@dataclass(frozen=True)
class Change:
    device: str
    model: str
    old_p50: float | None
    new_p50: float | None
    change: float | None  # (new - old) / old
    noise_ms: float | None  # twice the standard error of the difference
    slower: bool
    worse_check: str | None  # why the check got worse, or None
    only_in: str | None = None  # "old" or "new" when the row is in one run only

    @property
    def regressed(self) -> bool:
        return self.slower or self.worse_check is not None


def load_records(path: Path) -> list[dict[str, Any]]:
    """The records of `edgekit bench --json` (a list), `--jsonl` (one per line) or `deploy
    --json` (one record)."""
    try:
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError:  # `--jsonl`: one record per line
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
    except FileNotFoundError as exc:
        raise EdgekitError(f"{path}: no such results file") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgekitError(f"{path} is not a JSON file of edgekit results: "
                           f"{str(exc).splitlines()[0][:120]}") from exc
    records = [data] if isinstance(data, dict) else data
    if not isinstance(records, list) or not all(
            isinstance(r, dict) and "device" in r and "model" in r for r in records):
        raise EdgekitError(f"{path} holds no edgekit result records (from `edgekit bench --json`)")
    return records


def failed_records(path: Path) -> list[dict[str, Any]]:
    """The records of a results file that did not pass (what `bench --rerun-failed` runs)."""
    return [r for r in load_records(path) if r.get("status") != "ok"]


def compare_runs(old: list[dict[str, Any]], new: list[dict[str, Any]],
                 max_slowdown: float = MAX_SLOWDOWN) -> list[Change]:
    before = {(r["device"], r["model"]): r for r in old}
    after = {(r["device"], r["model"]): r for r in new}
    changes = []
    for key in [*before, *(k for k in after if k not in before)]:
        a, b = before.get(key), after.get(key)
        if a is None or b is None:
            changes.append(Change(key[0], key[1], _p50(a), _p50(b), None, None, False, None,
                                  only_in="old" if b is None else "new"))
            continue
        changes.append(_judge(key, a, b, max_slowdown))
    return changes


def _judge(key: tuple[str, str], a: dict[str, Any], b: dict[str, Any],
           max_slowdown: float) -> Change:
    old_p50, new_p50 = _p50(a), _p50(b)
    change = noise = None
    slower = False
    if old_p50 and new_p50:
        change = (new_p50 - old_p50) / old_p50
        noise = 2 * math.sqrt(_variance_of_mean(a) + _variance_of_mean(b))
        slower = change > max_slowdown and (new_p50 - old_p50) > noise
    return Change(key[0], key[1], old_p50, new_p50, change, noise, slower, _worse_check(a, b))


def _p50(record: dict[str, Any] | None) -> float | None:
    latency = (record or {}).get("latency_ms") or {}
    value = latency.get("p50")
    return float(value) if isinstance(value, (int, float)) else None


def _variance_of_mean(record: dict[str, Any]) -> float:
    latency = record.get("latency_ms") or {}
    std, n = latency.get("std") or 0.0, latency.get("n") or 1
    return float(std) ** 2 / max(int(n), 1)


def _worse_check(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    if a.get("status") == "ok" and b.get("status") != "ok":
        return f"was ok, now failed: {b.get('error') or 'no reason given'}"
    old_rel, new_rel = a.get("rel_err"), b.get("rel_err")
    if isinstance(new_rel, (int, float)) and new_rel > CHECK_RTOL and not (
            isinstance(old_rel, (int, float)) and old_rel > CHECK_RTOL):
        return f"relative error {new_rel:.3g} now above {CHECK_RTOL:g} (was {old_rel})"
    return None
