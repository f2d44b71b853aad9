"""The torch adapter: models by name or file, deterministic inputs, reference outputs, export.

No model hub is reachable, so torchvision models get seeded random weights unless `--weights`
gives a state dict. Every model has an identity hash (architecture, weights, input) that keys the
compiled-artifact cache, so a changed weight file never reuses a stale library.
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hostkit.errors import ModelError

if TYPE_CHECKING:
    import torch

__all__ = ["ModelSpec", "LoadedModel", "load_model", "available_models", "BUILTIN_MODELS"]

DEFAULT_SEED = 0
DEFAULT_SHAPES = {"inception_v3": (1, 3, 299, 299)}
DEFAULT_SHAPE = (1, 3, 224, 224)
BUILTIN_MODELS = ("tinycnn",)


@dataclass(frozen=True)
class ModelSpec:
    """What the user asked for: a name or a `.pt2` path, plus optional weights and shape."""

    name: str
    weights: Path | None = None
    input_shape: tuple[int, ...] | None = None
    seed: int = DEFAULT_SEED


@dataclass
class LoadedModel:
    name: str
    program: Any  # torch.export.ExportedProgram, made lazily: only a cache miss needs it
    inputs: list[np.ndarray]
    identity: str
    _module: Any = None

    def reference(self) -> list[np.ndarray]:
        """PyTorch's outputs on the host, for the same weights and inputs the device gets."""
        import torch

        args = [torch.from_numpy(x) for x in self.inputs]
        with torch.no_grad():
            out = self._module(*args) if self._module is not None else self.program.module()(*args)
        outs = out if isinstance(out, (tuple, list)) else [out]
        return [o.detach().cpu().numpy() for o in outs]

    def exported(self) -> Any:
        """The ExportedProgram TVM imports."""
        if self.program is None:
            import torch

            args = tuple(torch.from_numpy(x) for x in self.inputs)
            try:
                self.program = torch.export.export(self._module, args)
            except Exception as exc:
                raise ModelError(f"torch.export failed for {self.name}: "
                                 f"{str(exc).splitlines()[0][:300]}", stage="export") from exc
        return self.program


def available_models() -> list[str]:
    import torchvision

    return sorted([*torchvision.models.list_models(module=torchvision.models), *BUILTIN_MODELS])


def load_model(spec: ModelSpec) -> LoadedModel:
    if spec.name.endswith((".pt2", ".pt")) or Path(spec.name).is_file():
        return _load_program_file(spec)
    return _load_named(spec)


def _tinycnn() -> "torch.nn.Module":
    """A small CNN (conv, batch norm, relu, pool, linear) for quick checks and tuning tests."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def _load_named(spec: ModelSpec) -> LoadedModel:
    import torch
    import torchvision

    names = available_models()
    if spec.name not in names:
        close = difflib.get_close_matches(spec.name, names, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ModelError(f"unknown model '{spec.name}': {hint}give a torchvision classification "
                         "model name or a path to a .pt2 file (`edgekit models` lists the names)",
                         stage="model")
    torch.manual_seed(spec.seed)
    if spec.name in BUILTIN_MODELS:
        module = _tinycnn()
        default_shape: tuple[int, ...] = (1, 3, 32, 32)
    else:
        module = torchvision.models.get_model(spec.name, weights=None)
        default_shape = DEFAULT_SHAPES.get(spec.name, DEFAULT_SHAPE)
    if spec.weights is not None:
        _load_weights(module, spec.weights, spec.name)
    module.eval()
    shape = spec.input_shape or default_shape
    inputs = [_input(shape, spec.seed)]
    identity = _hash_module(spec.name, module, shape)
    return LoadedModel(name=spec.name, program=None, inputs=inputs, identity=identity,
                       _module=module)


def _load_weights(module: "torch.nn.Module", path: Path, name: str) -> None:
    import torch

    if not path.is_file():
        raise ModelError(f"weights file {path} not found", stage="model")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"weights file {path} is not a readable state dict: "
                         f"{str(exc).splitlines()[0][:200]}", stage="model") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError) as exc:
        first = str(exc).splitlines()[0][:200]
        raise ModelError(f"weights file {path} does not fit {name}: {first}", stage="model") from exc


def _load_program_file(spec: ModelSpec) -> LoadedModel:
    import torch

    path = Path(spec.name)
    if not path.is_file():
        raise ModelError(f"model file {path} not found", stage="model")
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise ModelError(f"{path} is not a saved ExportedProgram (torch.export.save): "
                         f"{str(exc).splitlines()[0][:200]}", stage="model") from exc
    if spec.input_shape is not None:
        shapes = [spec.input_shape]
    else:
        shapes = [tuple(node.meta["val"].shape) for node in program.graph.nodes
                  if node.op == "placeholder" and node.name in program.graph_signature.user_inputs]
    if not shapes:
        raise ModelError(f"{path}: cannot tell its input shape; pass --input-shape", stage="model")
    inputs = [_input(tuple(int(d) for d in s), spec.seed + i) for i, s in enumerate(shapes)]
    digest = hashlib.sha256(path.read_bytes())
    digest.update(repr(shapes).encode())
    return LoadedModel(name=path.name, program=program, inputs=inputs,
                       identity=digest.hexdigest())


def _input(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A deterministic input, the same on every run, so outputs can be compared across runs."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def _hash_module(name: str, module: "torch.nn.Module", shape: tuple[int, ...]) -> str:
    digest = hashlib.sha256(f"{name}|{shape}|{type(module).__qualname__}".encode())
    for key, tensor in module.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
