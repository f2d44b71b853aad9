"""Models by name: torchvision's classifiers and edgekit's own small ones.

No model hub is reachable, so torchvision models get seeded random weights, initialised from data
so their outputs carry signal (`hostkit.models.init`), unless `--weights` gives a state dict.
"""

from __future__ import annotations

import difflib
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hostkit.errors import ModelError
from hostkit.models.base import LoadedModel, ModelSpec, make_input
from hostkit.models.init import INIT_METHOD, live_init

if TYPE_CHECKING:
    import torch

__all__ = ["available_models", "load_named", "preprocessing_for", "BUILTIN_MODELS"]

DEFAULT_SHAPES = {"inception_v3": (1, 3, 299, 299)}
DEFAULT_SHAPE = (1, 3, 224, 224)
BUILTIN_MODELS = ("tinycnn",)


def available_models() -> list[str]:
    import torchvision

    return sorted([*torchvision.models.list_models(module=torchvision.models), *BUILTIN_MODELS])


def _tinycnn() -> "torch.nn.Module":
    """A small CNN (conv, batch norm, relu, pool, linear) for quick checks and tuning tests."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def load_named(spec: ModelSpec) -> LoadedModel:
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
    shape = spec.input_shape or default_shape
    if spec.weights is not None:
        _load_weights(module, spec.weights, spec.name)
        origin = f"weights={spec.weights.name}"
    else:
        live_init(module, shape, spec.seed)
        origin = f"seed={spec.seed}|init={INIT_METHOD}"
    module.eval()
    inputs = [make_input(shape, spec.seed)]
    identity = _hash_module(f"{spec.name}|{origin}", module, shape)
    return LoadedModel(name=spec.name, program=None, inputs=inputs, identity=identity,
                       _module=module)


def preprocessing_for(name: str) -> dict[str, Any]:
    """What a real image goes through before this model sees it: torchvision's transforms for
    its classifiers (those of the architecture's trained weights), nothing for edgekit's own
    models and saved programs, whose inputs are tensors as given."""
    import torchvision

    if name in BUILTIN_MODELS or name not in available_models():
        return {"kind": "none", "note": "the input tensor is fed as given"}
    try:
        transforms = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    except (ValueError, AttributeError):
        return {"kind": "none", "note": "torchvision names no transforms for this model"}
    return {"kind": "torchvision-image-classification", "resize": list(transforms.resize_size),
            "crop": list(transforms.crop_size), "interpolation": transforms.interpolation.value,
            "scale": "1/255", "mean": list(transforms.mean), "std": list(transforms.std),
            "layout": "NCHW", "channels": "RGB"}


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


def _hash_module(name: str, module: "torch.nn.Module", shape: tuple[int, ...]) -> str:
    digest = hashlib.sha256(f"{name}|{shape}|{type(module).__qualname__}".encode())
    for key, tensor in module.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
