"""Inputs the user gives (`--input FILE`): images preprocessed as the model's own transforms do,
or `.npy` tensors taken as they are.

An image goes through the transforms torchvision publishes with the model's weights (resize,
centre crop, scale to [0, 1], normalise), which need no download: a classifier sees 224x224 after
a 256 resize, a segmenter the image with its short side at 520. The model is then built for that
shape, so a deploy on a real photo checks the shapes a camera gives. A `.npy` must hold float32
(or a float that converts without loss of meaning) in the shape the model takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hostkit.errors import ModelError

__all__ = ["IMAGE_SUFFIXES", "read_input", "describe"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
# The largest input file edgekit reads: a 4K RGB frame as float32 is about 100 MB.
MAX_INPUT_BYTES = 256 * 1024 * 1024


def read_input(path: Path, model_name: str, transforms: Any | None) -> np.ndarray:
    """The input tensor `path` holds for `model_name`, batch 1, float32."""
    if not path.is_file():
        raise ModelError(f"input file {path} not found", stage="model")
    if path.stat().st_size > MAX_INPUT_BYTES:
        raise ModelError(f"input file {path} is larger than {MAX_INPUT_BYTES >> 20} MiB",
                         stage="model")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _read_npy(path)
    if suffix in IMAGE_SUFFIXES:
        return _read_image(path, model_name, transforms)
    raise ModelError(f"input file {path}: give an image ({', '.join(IMAGE_SUFFIXES)}) or a .npy "
                     "tensor", stage="model")


def _read_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ModelError(f"input file {path} is not a readable .npy array: "
                         f"{str(exc).splitlines()[0][:200]}", stage="model") from exc
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu":
        raise ModelError(f"input file {path} holds {getattr(array, 'dtype', type(array))}; "
                         "expected float32 numbers", stage="model")
    if array.ndim == 3:
        array = array[None]  # one image without its batch axis
    return np.ascontiguousarray(array, dtype=np.float32)


def _read_image(path: Path, model_name: str, transforms: Any | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if transforms is None:
        raise ModelError(f"input file {path}: {model_name} has no published preprocessing; "
                         "give a .npy tensor instead", stage="model")
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ModelError(f"input file {path} is not a readable image: "
                         f"{str(exc).splitlines()[0][:200]}", stage="model") from exc
    import torchvision.transforms.functional as F

    tensor = transforms(F.pil_to_tensor(rgb))
    return np.ascontiguousarray(tensor.unsqueeze(0).numpy(), dtype=np.float32)


def describe(transforms: Any | None) -> str | None:
    """The preprocessing in one line, for the summary and a bundle's manifest."""
    if transforms is None:
        return None
    return " ".join(str(transforms).split())
