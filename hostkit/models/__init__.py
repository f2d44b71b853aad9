"""Model sources: everything that turns what the user named into a model edgekit can build.

Each source (torchvision names in `zoo`, saved programs in `files`) yields a `LoadedModel`: an
exported program, deterministic inputs, PyTorch's reference outputs on the host, and an identity
hash (architecture, weights, input) that keys the compiled-artifact cache, so a changed weight file
never reuses a stale library. This is the torch adapter: nothing outside this folder imports torch
to read a model.
"""

from __future__ import annotations

from pathlib import Path

from hostkit.models.base import DEFAULT_SEED, LoadedModel, ModelSpec
from hostkit.models.zoo import BUILTIN_MODELS, available_models, preprocessing_for

__all__ = ["ModelSpec", "LoadedModel", "load_model", "available_models", "BUILTIN_MODELS",
           "DEFAULT_SEED", "preprocessing_for"]


def load_model(spec: ModelSpec) -> LoadedModel:
    """The model `spec` names: a `.pt2` file by path, otherwise a name from the zoo."""
    if spec.name.endswith((".pt2", ".pt")) or Path(spec.name).is_file():
        from hostkit.models.files import load_program_file

        return load_program_file(spec)
    from hostkit.models.zoo import load_named

    return load_named(spec)
