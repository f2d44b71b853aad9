"""What every model source produces: the user's request (`ModelSpec`) and the loaded model
(`LoadedModel`: an exported program, deterministic inputs, PyTorch's reference outputs, and an
identity hash that keys the compiled-artifact cache)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hostkit.errors import ModelError

__all__ = ["ModelSpec", "LoadedModel", "DEFAULT_SEED", "make_input"]

DEFAULT_SEED = 0


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
                           identity=f"{self.identity}|perturbed:{name}[0]", _module=module)


def make_input(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A deterministic input, the same on every run, so outputs can be compared across runs."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
