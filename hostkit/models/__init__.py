"""Model sources: everything that turns what the user named into a model edgekit can build.

Each source (torchvision names in `zoo`, saved programs in `files`) yields a `LoadedModel`: an
exported program, deterministic inputs, PyTorch's reference outputs on the host, and an identity
hash (architecture, weights, input) that keys the compiled-artifact cache, so a changed weight file
never reuses a stale library. This is the torch adapter: nothing outside this folder imports torch
to read a model.
"""

from __future__ import annotations

from pathlib import Path

from hostkit.errors import ModelError
from hostkit.models.base import DEFAULT_SEED, LoadedModel, ModelSpec
from hostkit.models.zoo import BUILTIN_MODELS, available_models, preprocessing_for

__all__ = ["ModelSpec", "LoadedModel", "load_model", "available_models", "BUILTIN_MODELS",
           "DEFAULT_SEED", "preprocessing_for"]


def load_model(spec: ModelSpec) -> LoadedModel:
    """The model `spec` names: a `.pt2` file by path, otherwise a name from the zoo; quantized to
    int8 with calibration when `spec.quantize` says so."""
    from hostkit.models.zoo import load_named, transforms_for

    if spec.name.endswith((".pt2", ".pt")) or Path(spec.name).is_file():
        from hostkit.models.files import load_program_file
        from hostkit.models.pt2e import from_pt2e, is_pt2e

        model = load_program_file(spec)
        if is_pt2e(model.program):
            if spec.quantize is not None:
                raise ModelError(f"{spec.name} is already quantized (PT2E); drop --quantize, its "
                                 "own scales are used", stage="quantize")
            return from_pt2e(model)
    else:
        model = load_named(spec)
    if spec.quantize is None:
        return model
    if spec.quantize != "int8":
        raise ModelError(f"--quantize {spec.quantize}: only int8 is supported", stage="quantize")
    from hostkit.models.quantize import calibration_samples, quantize_int8

    samples = calibration_samples(spec.calibration, model, transforms_for(model.name))
    quantized, _ = quantize_int8(model, samples, spec.calibration_method)
    return quantized
