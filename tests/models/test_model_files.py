"""Model and weights files that do not fit: one line naming the file and what differs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hostkit.errors import ModelError
from hostkit.models import ModelSpec, load_model


def _tiny_state() -> dict[str, torch.Tensor]:
    model = load_model(ModelSpec("tinycnn"))
    return {k: v.clone() for k, v in model._module.state_dict().items()}


def test_weights_for_another_architecture_name_the_first_key(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    state = _tiny_state()
    state["8.weight"] = torch.zeros(5, 32)
    torch.save(state, path)
    with pytest.raises(ModelError, match=r"does not fit tinycnn: '8.weight' has shape \(5, 32\) "
                                         r"in the file, \(10, 32\) in the model"):
        load_model(ModelSpec("tinycnn", weights=path))
    state = _tiny_state()
    del state["0.bias"]
    torch.save(state, path)
    with pytest.raises(ModelError, match="it has no '0.bias' \\(is it for another architecture"):
        load_model(ModelSpec("tinycnn", weights=path))
    state = _tiny_state()
    state["head.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(ModelError, match="it has 'head.weight', which the model lacks"):
        load_model(ModelSpec("tinycnn", weights=path))
    torch.save([1, 2, 3], path)
    with pytest.raises(ModelError, match="holds a list, not a state dict"):
        load_model(ModelSpec("tinycnn", weights=path))


def test_saved_programs_that_cannot_be_fed(tmp_path: Path) -> None:
    class Constant(torch.nn.Module):
        def forward(self) -> torch.Tensor:
            return torch.ones(3)

    empty = tmp_path / "empty.pt2"
    torch.export.save(torch.export.export(Constant(), ()), empty)
    with pytest.raises(ModelError, match="the saved program takes no inputs"):
        load_model(ModelSpec(str(empty)))

    tiny = load_model(ModelSpec("tinycnn", input_shape=(1, 3, 24, 24)))
    saved = tmp_path / "tiny.pt2"
    torch.export.save(tiny.exported(), saved)
    with pytest.raises(ModelError, match=r"input 0 \(\w+\) was saved with shape \(1, 3, 24, 24\); "
                                         r"got \(1, 3, 32, 32\)"):
        load_model(ModelSpec(str(saved), input_shape=(1, 3, 32, 32)))

    class Two(torch.nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a + b

    two = tmp_path / "two.pt2"
    torch.export.save(torch.export.export(Two(), (torch.ones(2), torch.ones(2))), two)
    with pytest.raises(ModelError, match=r"takes 2 inputs \(a, b\); --input-shape gives one"):
        load_model(ModelSpec(str(two), input_shape=(2,)))
    assert len(load_model(ModelSpec(str(two))).inputs) == 2
