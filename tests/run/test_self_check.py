"""The check can fail: seeded models carry signal, and a changed weight on the device is caught.

Integration half: a real daemon on loopback gets, for each model family edgekit supports, first
the model as it is (ok, with a reference of order one) and then a copy with one weight changed
(`--perturb`: failed at the check, with the relative error in the message). Slow half: every
torchvision classifier's seeded outputs have a magnitude of order one, not dead logits.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hostkit.cli import main

pytestmark = pytest.mark.integration

# One model per family edgekit deploys: edgekit's own, a torchvision classifier, a saved program.
FAMILIES = ["tinycnn", "squeezenet1_1", "pt2"]


def _deploy(inv: Path, model: str, *extra: str) -> tuple[int, dict[str, Any], str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["deploy", "-i", str(inv), "-d", "dev", model, "--json", "--repeat", "1",
                     "--warmup", "0", *extra])
    return code, json.loads(out.getvalue()), err.getvalue()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_changed_weight_fails_the_check(family: str, daemon: Any, write_inventory: Any,
                                          tmp_path: Path) -> None:
    inv = write_inventory({"devices": {"dev": {"target": {"kind": "llvm"}, "host": "127.0.0.1",
                                               "port": daemon.port}}})
    model = family
    if family == "pt2":
        import torch

        from hostkit.models import ModelSpec, load_model

        loaded = load_model(ModelSpec("tinycnn", input_shape=(1, 3, 24, 24), seed=3))
        model = str(tmp_path / "tiny.pt2")
        torch.export.save(loaded.exported(), model)

    code, good, _ = _deploy(inv, model)
    assert code == 0 and good["status"] == "ok", good["error"]
    assert good["ref_max"] > 0.5, "seeded outputs must carry signal, not dead logits"
    assert good["rel_err"] < 1e-5 and good["cosine"] > 0.99999 and not good["perturbed"]

    code, bad, _ = _deploy(inv, model, "--perturb")
    assert code == 1 and bad["status"] == "failed" and bad["stage"] == "check"
    assert bad["perturbed"] is True and bad["rel_err"] > 1e-4
    assert "relative error" in bad["error"] and "rtol 0.0001" in bad["error"]
    assert bad["artifact_sha256"] != good["artifact_sha256"], "the device ran the changed copy"


def test_failed_check_summary_says_what_was_compared(daemon: Any, write_inventory: Any,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    inv = write_inventory({"devices": {"dev": {"target": {"kind": "llvm"}, "host": "127.0.0.1",
                                               "port": daemon.port}}})
    assert main(["deploy", "-i", str(inv), "-d", "dev", "tinycnn", "--perturb", "--repeat", "1"]) == 1
    captured = capsys.readouterr()
    assert "PyTorch's outputs up to" in captured.out and "self-test" in captured.out
    assert "edgekit: error: dev: outputs differ from PyTorch: relative error" in captured.err


def _one_classifier_per_architecture() -> list[str]:
    """torchvision's classifiers, one per architecture (`vit`, `regnet`, `resnet`, ...): the
    seeded initialisation is per layer kind, so sizes of one architecture prove nothing more, and
    all 80 (vit_h_14, regnet_y_128gf) cost CI five minutes. The shortest name of each stands."""
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    first: dict[str, str] = {}
    for name in sorted(names, key=lambda n: (len(n), n)):
        first.setdefault(re.match(r"[a-z]+", name).group(0), name)  # type: ignore[union-attr]
    return sorted(first.values())


@pytest.mark.slow
def test_every_classifier_architecture_has_live_outputs() -> None:
    """Seeded outputs above 1e-3 with a spread of order one, for every torchvision classifier
    architecture."""
    from hostkit.models import ModelSpec, load_model

    dead = []
    for name in _one_classifier_per_architecture():
        logits = load_model(ModelSpec(name)).reference()[0].ravel()
        magnitude, spread = float(np.abs(logits).max()), float(logits.std())
        if not (magnitude >= 1e-3 and 0.1 <= spread):
            dead.append(f"{name}: max |logit| {magnitude:.3g}, std {spread:.3g}")
    assert not dead, "\n".join(dead)
