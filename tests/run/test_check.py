"""Unit tests of the check against PyTorch: relative error, cosine, shapes, dead outputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hostkit.run.check import RTOL, compare_outputs


def test_close_outputs_pass_and_report_what_was_compared() -> None:
    want = [np.array([[0.1, 0.9, 0.3, 0.2, 0.5, 0.7, -2.0]], dtype=np.float32)]
    same = compare_outputs([want[0] + 1e-6], want)
    assert same.max_abs_diff == pytest.approx(1e-6, rel=0.1)
    assert same.ref_max == pytest.approx(2.0) and same.rel_err == pytest.approx(5e-7, rel=0.1)
    assert same.cosine == pytest.approx(1.0) and same.top1_match and same.top5_match
    assert same.passed()


def test_top_k_and_relative_failure() -> None:
    want = [np.array([[0.1, 0.9, 0.3, 0.2, 0.5, 0.7, 0.0]], dtype=np.float32)]
    swapped = want[0].copy()
    swapped[0, 1], swapped[0, 5] = 0.7, 0.9
    moved = compare_outputs([swapped], want)
    assert moved.top1_match is False and moved.top5_match is True
    assert not moved.passed() and moved.rel_err == pytest.approx(0.2 / 0.9, rel=1e-4)
    assert "relative error 0.222 > rtol 0.0001" in moved.reason()


def test_near_zero_outputs_cannot_pass_by_being_small() -> None:
    """Dead outputs (1e-15) pass any absolute tolerance; the relative error exposes them."""
    rng = np.random.default_rng(0)
    want = [rng.standard_normal((1, 1000)).astype(np.float32) * 1e-15]
    garbage = [rng.standard_normal((1, 1000)).astype(np.float32) * 1e-15]
    check = compare_outputs(garbage, want)
    assert check.max_abs_diff < 1e-13 and not check.passed(RTOL)
    assert check.cosine is not None and abs(check.cosine) < 0.2


def test_shape_and_count_mismatches_name_both_sides() -> None:
    want = [np.zeros((1, 10), dtype=np.float32)]
    shape = compare_outputs([np.zeros((1, 3))], want)
    assert shape.problem == "output 0 has shape (1, 3) on the device, (1, 10) in PyTorch"
    assert math.isinf(shape.max_abs_diff) and not shape.passed()
    count = compare_outputs([want[0], want[0]], want)
    assert count.problem == "the device returned 2 outputs, PyTorch 1" and not count.passed()


def test_nan_on_the_device_fails() -> None:
    want = [np.ones((1, 4), dtype=np.float32)]
    assert not compare_outputs([np.full((1, 4), np.nan, dtype=np.float32)], want).passed()
