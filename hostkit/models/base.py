"""What every model source produces: the user's request (`ModelSpec`) and the loaded model
(`LoadedModel`: an exported program, deterministic inputs, PyTorch's reference outputs, and an
identity hash that keys the compiled-artifact cache)."""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hostkit.errors import ModelError

if TYPE_CHECKING:
    from hostkit.models.host_steps import HostSteps

__all__ = ["ModelSpec", "LoadedModel", "DEFAULT_SEED", "make_input"]

DEFAULT_SEED = 0


@dataclass(frozen=True)
class ModelSpec:
    """What the user asked for: a name or a `.pt2` path, plus optional weights and shape."""

    name: str
    weights: Path | None = None
    input_shape: tuple[int, ...] | None = None
    seed: int = DEFAULT_SEED
    inputs: tuple[str, ...] = ()  # --input files: images or .npy tensors, in input order
    named_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()  # --input-shape NAME=DIMS
    quantize: str | None = None  # "int8"
    calibration: str = "32"  # a sample count, or a folder of images or .npy files
    calibration_method: str = "minmax"


@dataclass
class LoadedModel:
    name: str
    program: Any  # torch.export.ExportedProgram, made lazily: only a cache miss needs it
    inputs: list[np.ndarray]
    identity: str
    _module: Any = None
    family: str = "classification"  # what the check compares: logits, or per-pixel classes
    preprocessing: str | None = None  # the transforms an image input went through
    output_names: list[str] = field(default_factory=list)  # filled by reference()
    precision: str = "fp32"  # "int8": quantized by hostkit.models.quantize
    quantization: Any = None  # what quantizing did (hostkit.models.quantize.Quantization)
    _exact: list[np.ndarray] | None = field(default=None, init=False, repr=False)

    def reference(self) -> list[np.ndarray]:
        """PyTorch's outputs on the host, for the same weights and inputs the device gets.

        Tuples, lists and dicts are flattened in order (the order TVM's importer returns them),
        and `output_names` says which is which (`out`, `aux`, or `output0`, `output1`, ...).
        """
        import torch

        args = [torch.from_numpy(x) for x in self.inputs]
        with torch.no_grad():
            out = self._module(*args) if self._module is not None else self.program.module()(*args)
        named = _flatten("output", out)
        self.output_names = [name for name, _ in named]
        return [value.detach().cpu().numpy() for _, value in named]

    def exact_reference(self) -> list[np.ndarray] | None:
        """PyTorch's outputs with the model evaluated in float64, in `reference()`'s order: the
        exact answer the float32 runs (PyTorch's and the device's) each round their own way.
        A detector's top-k and NMS pick among near-equal scores, so where PyTorch's float32
        rounding decides a near tie one way and the device's the other, this one says which
        is right (`hostkit.run.deploy`). None for a saved program (its graph fixes the
        dtypes) and a quantized model."""
        if self._module is None or self.precision != "fp32":
            return None
        if self._exact is None:
            import copy

            import torch

            module = copy.deepcopy(self._module).double()
            args = [torch.from_numpy(x).double() for x in self.inputs]
            with torch.no_grad():
                out = module(*args)
            self._exact = [value.detach().cpu().numpy() for _, value in _flatten("output", out)]
        return self._exact

    def host_steps(self) -> HostSteps:
        """What the host does to a detector's outputs after the part that runs on the device:
        pasting per-detection masks into the image, decoding per-detection keypoint heatmaps
        (`hostkit.models.host_steps`). Outputs not named as a detector's are never touched."""
        from hostkit.models.host_steps import HostSteps

        *_, height, width = (1, 1, *self.inputs[0].shape)
        return HostSteps(image_hw=(int(height), int(width)))

    def exported(self) -> Any:
        """The ExportedProgram TVM imports."""
        if self.program is None:
            import torch

            args = tuple(torch.from_numpy(x) for x in self.inputs)
            # A failed export prints the whole traced graph (thousands of lines) on stderr; the
            # exception says what matters, and _export_error keeps that in one line.
            patches: Any = contextlib.nullcontext()
            if self.family == "detection":
                from hostkit.models.detection import exportable

                patches = exportable()
            try:
                with contextlib.redirect_stderr(io.StringIO()), \
                        contextlib.redirect_stdout(io.StringIO()), patches:
                    self.program = torch.export.export(self._module, args)
            except Exception as exc:
                raise ModelError(_export_error(self.name, exc), stage="export") from exc
        return self.program

    def params_bytes(self) -> int:
        """The weights' bytes as the device holds them (int8 weights count one byte each)."""
        if self.quantization is not None:
            return int(self.quantization.int8_mb * 1e6)
        if self._module is not None:
            state = self._module.state_dict()
        else:
            state = {**self.program.state_dict, **getattr(self.program, "constants", {})}
        return sum(t.numel() * t.element_size() for k, t in state.items()
                   if hasattr(t, "numel") and not k.endswith("num_batches_tracked"))

    def io_names(self) -> tuple[list[str], list[str]]:
        """The program's own names for its inputs and outputs, in the order main takes and
        returns them (an export's manifest shows them)."""
        signature = self.exported().graph_signature
        return [str(n) for n in signature.user_inputs], [str(n) for n in signature.user_outputs]

    def perturbed(self) -> "LoadedModel":
        """A copy with one weight changed: deployed against this model's reference, the check
        must fail. It proves on a real device that the check can fail (`deploy --perturb`)."""
        import copy

        import torch

        module = copy.deepcopy(self._module) if self._module is not None else self.program.module()
        name, weight = next((n, p) for n, p in module.named_parameters()
                            if p.is_floating_point() and p.ndim >= 2)
        with torch.no_grad():
            flat = weight.view(-1)
            flat[0] += 1.0 + float(weight.abs().max())
        return LoadedModel(name=self.name, program=None, inputs=self.inputs,
                           identity=f"{self.identity}|perturbed:{name}[0]", _module=module,
                           family=self.family, preprocessing=self.preprocessing,
                           output_names=self.output_names, precision=self.precision,
                           quantization=self.quantization)


def _flatten(name: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [leaf for key, item in value.items() for leaf in _flatten(str(key), item)]
    if isinstance(value, (tuple, list)):
        if len(value) == 1:
            return _flatten(name, value[0])
        return [leaf for i, item in enumerate(value) for leaf in _flatten(f"{name}{i}", item)]
    return [(name, value)]


def _export_error(name: str, exc: Exception) -> str:
    """One line: what stopped torch.export, and where in the model's code."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    first = lines[0] if lines else type(exc).__name__
    where = next((line for line in lines if line.startswith("Caused by:")), "")
    if "data-dependent" in first:
        first = "a data-dependent guard (the output size depends on the values computed)"
    place = _model_frame(exc) or where.removeprefix("Caused by:").strip(" ()")
    return f"torch.export failed for {name}: {first[:200]}{f' at {place}' if place else ''}"


def _model_frame(exc: Exception) -> str | None:
    """The innermost frame of the traceback in the model's code, not torch's or Python's own,
    as `path:line in function: code`. torch's `Caused by:` names the frame that asked the guard,
    which is torch's operator dispatch (`_ops.py:916 in __call__`) when an operator's own
    C++ asked it (batch norm asking whether its input is empty); the model's line calling
    that operator is the one a patch has to replace."""
    import sysconfig
    import traceback

    import torch

    own = (os.path.dirname(torch.__file__) + os.sep, sysconfig.get_paths()["stdlib"] + os.sep,
           __file__, "<")  # "<string>": code torch generates
    frames = [frame for frame in traceback.extract_tb(exc.__traceback__)
              if not frame.filename.startswith(own)]
    if not frames:
        return None
    frame = frames[-1]
    code = f": {frame.line[:80]}" if frame.line else ""
    return f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno} in {frame.name}{code}"


def split_named(entry: str) -> tuple[str | None, str]:
    """`NAME=FILE` as (NAME, FILE); a plain path (even one holding '=') as (None, path)."""
    name, sep, rest = entry.partition("=")
    if sep and name.isidentifier() and not Path(entry).exists():
        return name, rest
    return None, entry


def make_input(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A deterministic input, the same on every run, so outputs can be compared across runs."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
