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


def test_an_effectful_operator_is_named() -> None:
    """torch.linalg.inv decomposes into an error check torch.export threads with effect tokens;
    TVM's importer said only 'Unsupported input kind: InputKind.TOKEN'."""
    import numpy as np

    from hostkit.build.compiler import import_relax
    from hostkit.errors import CompileError
    from hostkit.models.base import LoadedModel

    class Inverse(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.linalg.inv(x)

    model = LoadedModel(name="inverse", program=None, identity="inverse", _module=Inverse(),
                        inputs=[np.eye(3, dtype=np.float32) + 0.1])
    with pytest.raises(CompileError, match=r"inverse: TVM's PyTorch importer cannot take "
                                           r"operator\(s\) with side effects "
                                           r"\(aten._linalg_check_errors\)"):
        import_relax(model)


def test_several_inputs_by_name(tmp_path: Path) -> None:
    import numpy as np

    class Two(torch.nn.Module):
        def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return image * mask

    saved = tmp_path / "two.pt2"
    torch.export.save(torch.export.export(Two(), (torch.ones(1, 4), torch.ones(1, 4))), saved)
    np.save(tmp_path / "i.npy", np.full((1, 4), 2.0, np.float32))
    np.save(tmp_path / "m.npy", np.full((1, 4), 3.0, np.float32))
    model = load_model(ModelSpec(str(saved), inputs=(f"mask={tmp_path / 'm.npy'}",
                                                     f"image={tmp_path / 'i.npy'}")))
    assert [x[0, 0] for x in model.inputs] == [2.0, 3.0], "inputs go in the program's order"
    with pytest.raises(ModelError, match="has no input named img; its inputs are image, mask"):
        load_model(ModelSpec(str(saved), inputs=(f"img={tmp_path / 'i.npy'}",)))
    with pytest.raises(ModelError, match="also takes mask; give NAME=FILE for each input"):
        load_model(ModelSpec(str(saved), inputs=(f"image={tmp_path / 'i.npy'}",)))
    with pytest.raises(ModelError, match=r"input 1 \(mask\) was saved with shape \(1, 4\); "
                                         r"got \(1, 8\)"):
        load_model(ModelSpec(str(saved), named_shapes=(("mask", (1, 8)),)))
