"""Real boards: run only when EDGEKIT_TEST_DEVICE names an inventory device (and
EDGEKIT_INVENTORY, or ./inventory.yaml, describes it); skipped otherwise."""

from __future__ import annotations

import json
import os

import pytest

from hostkit.cli import main

DEVICE = os.environ.get("EDGEKIT_TEST_DEVICE")

pytestmark = [pytest.mark.hardware,
              pytest.mark.skipif(not DEVICE, reason="no real board: set EDGEKIT_TEST_DEVICE=NAME")]


@pytest.mark.parametrize("model", ["tinycnn", "resnet18"])
def test_deploy_on_a_real_board(model: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert DEVICE is not None
    code = main(["deploy", "--device", DEVICE, model, "--json", "--repeat", "5"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0, result["error"]
    assert result["max_abs_diff"] < 1e-4 and result["top1_match"]
