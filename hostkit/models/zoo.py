"""Models by name: torchvision's classifiers, segmenters and detectors, and edgekit's own small one.

No model hub is reachable, so torchvision models get seeded random weights, initialised from data
so their outputs carry signal (`hostkit.models.init`), unless `--weights` gives a state dict.
Segmenters return a dict (`out`, and `aux` when built with it): its entries become the model's
named outputs. Detectors (`hostkit.models.detection`) are built for the input's own size, with a
score threshold of 0 when seeded, and return `boxes`, `scores`, `labels` (and `masks`).
"""

from __future__ import annotations

import difflib
import hashlib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hostkit.errors import ModelError
from hostkit.models.base import LoadedModel, ModelSpec, make_input, split_named
from hostkit.models.detection import DEFAULT_SHAPE as DETECTION_SHAPE
from hostkit.models.detection import DEFAULT_SHAPES as DETECTION_SHAPES
from hostkit.models.detection import detector_kwargs, seeded_regression
from hostkit.models.init import INIT_METHOD, live_init
from hostkit.models.inputs import IMAGE_SUFFIXES, describe, read_input

if TYPE_CHECKING:
    import torch

__all__ = ["available_models", "families", "family_of", "load_named", "transforms_for",
           "preprocessing_for", "BUILTIN_MODELS", "FAMILIES"]

DEFAULT_SHAPES = {"inception_v3": (1, 3, 299, 299)}
DEFAULT_SHAPE = (1, 3, 224, 224)
BUILTIN_MODELS = ("tinycnn",)
# The families edgekit lists, in the order `edgekit models` shows them.
FAMILIES = ("classification", "segmentation", "detection")


def families() -> dict[str, list[str]]:
    """Model names by family: torchvision's classifiers (and tinycnn), segmenters, detectors."""
    import torchvision

    models = torchvision.models
    return {
        "classification": sorted([*models.list_models(module=models), *BUILTIN_MODELS]),
        "segmentation": sorted(models.list_models(module=models.segmentation)),
        "detection": sorted(models.list_models(module=models.detection)),
    }


def available_models() -> list[str]:
    return sorted(name for names in families().values() for name in names)


def family_of(name: str) -> str | None:
    return next((family for family, names in families().items() if name in names), None)


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
        raise ModelError(f"unknown model '{spec.name}': {hint}give a torchvision model name or "
                         "a path to a .pt2 file (`edgekit models` lists the names)", stage="model")
    family = family_of(spec.name) or "classification"
    torch.manual_seed(spec.seed)
    transforms = None
    if spec.name in BUILTIN_MODELS:
        module = _tinycnn()
        default_shape: tuple[int, ...] = (1, 3, 32, 32)
    else:
        module = torchvision.models.get_model(spec.name, weights=None, **_no_downloads(family))
        default_shape = DEFAULT_SHAPES.get(spec.name, DEFAULT_SHAPE)
        if family == "detection":
            default_shape = DETECTION_SHAPES.get(spec.name, DETECTION_SHAPE)
        transforms = torchvision.models.get_model_weights(spec.name).DEFAULT.transforms()
    given = [read_input(Path(split_named(entry)[1]), spec.name, transforms)
             for entry in spec.inputs]
    if len(given) > 1:
        raise ModelError(f"{spec.name} takes one input; got {len(given)} --input files",
                         stage="model")
    shape = tuple(given[0].shape) if given else (spec.input_shape or default_shape)
    built = ""
    if family == "detection":  # built for the input's size, with a low threshold when seeded
        kwargs = detector_kwargs(spec.name, shape, seeded=spec.weights is None)
        module = torchvision.models.get_model(spec.name, weights=None, **_no_downloads(family),
                                              **kwargs)
        built = f"|{sorted(kwargs.items())}"
    if spec.weights is not None:
        _load_weights(module, spec.weights, spec.name)
        origin = f"weights={spec.weights.name}"
    else:
        live_init(module, shape, spec.seed)
        if family == "detection":
            seeded_regression(module)
        origin = f"seed={spec.seed}|init={INIT_METHOD}"
    module.eval()
    inputs = given or [make_input(shape, spec.seed)]
    identity = _hash_module(f"{spec.name}|{origin}{built}", module, shape)
    model = LoadedModel(name=spec.name, program=None, inputs=inputs, identity=identity,
                        _module=module, family=family,
                        preprocessing=describe(transforms) if _has_image(spec) else None)
    return model


def transforms_for(name: str) -> Any | None:
    """The preprocessing torchvision publishes with `name`'s weights (no download), if any."""
    import torchvision

    if name not in available_models() or name in BUILTIN_MODELS:
        return None
    return torchvision.models.get_model_weights(name).DEFAULT.transforms()


def _has_image(spec: ModelSpec) -> bool:
    return any(Path(path).suffix.lower() in IMAGE_SUFFIXES for path in spec.inputs)


def _no_downloads(family: str) -> dict[str, object]:
    """Constructor arguments that keep torchvision from fetching pretrained backbone weights."""
    return {"weights_backbone": None} if family in ("segmentation", "detection") else {}


def preprocessing_for(name: str) -> dict[str, Any]:
    """What a real image goes through before this model sees it (an export's manifest shows it):
    the transforms torchvision publishes with the architecture's weights, nothing for edgekit's
    own models and saved programs, whose inputs are tensors as given."""
    transforms = transforms_for(name)
    if transforms is None:
        return {"kind": "none", "note": "the input tensor is fed as given"}
    kind = re.sub(r"(?<!^)(?=[A-Z])", "-", type(transforms).__name__).lower()
    described = {"kind": f"torchvision-{kind}",
                 "resize": list(getattr(transforms, "resize_size", None) or []),
                 "crop": list(getattr(transforms, "crop_size", None) or []),
                 "scale": "1/255", "layout": "NCHW", "channels": "RGB"}
    for key in ("mean", "std"):
        if hasattr(transforms, key):
            described[key] = list(getattr(transforms, key))
    if hasattr(transforms, "interpolation"):
        described["interpolation"] = transforms.interpolation.value
    return described


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
    if not isinstance(state, dict):
        raise ModelError(f"weights file {path} holds a {type(state).__name__}, not a state dict "
                         "(save one with torch.save(model.state_dict(), FILE))", stage="model")
    mismatch = _first_mismatch(module.state_dict(), state)
    if mismatch:
        raise ModelError(f"weights file {path} does not fit {name}: {mismatch}", stage="model")
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError) as exc:
        first = str(exc).splitlines()[0][:200]
        raise ModelError(f"weights file {path} does not fit {name}: {first}", stage="model") from exc


def _first_mismatch(want: dict[str, Any], have: dict[str, Any]) -> str | None:
    """The first key the weights file lacks, adds, or holds in another shape, in words."""
    for key, tensor in want.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key not in have:
            return f"it has no '{key}' (is it for another architecture?)"
        got = tuple(getattr(have[key], "shape", ()))
        if got != tuple(tensor.shape):
            return (f"'{key}' has shape {got} in the file, {tuple(tensor.shape)} in the model "
                    "(another number of classes, or another architecture?)")
    extra = next((k for k in have if k not in want), None)
    return f"it has '{extra}', which the model lacks" if extra else None


def _hash_module(name: str, module: "torch.nn.Module", shape: tuple[int, ...]) -> str:
    digest = hashlib.sha256(f"{name}|{shape}|{type(module).__qualname__}".encode())
    for key, tensor in module.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
