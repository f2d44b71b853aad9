"""Models from files: a saved `torch.export` program (`.pt2`), with the shapes it was saved with."""

from __future__ import annotations

import hashlib
from pathlib import Path

from hostkit.errors import ModelError
from hostkit.models.base import LoadedModel, ModelSpec, make_input
from hostkit.models.inputs import read_input

__all__ = ["load_program_file"]


def load_program_file(spec: ModelSpec) -> LoadedModel:
    import torch

    path = Path(spec.name)
    if not path.is_file():
        raise ModelError(f"model file {path} not found", stage="model")
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise ModelError(f"{path} is not a saved ExportedProgram (torch.export.save): "
                         f"{str(exc).splitlines()[0][:200]}", stage="model") from exc
    given = [read_input(Path(p), path.name, None) for p in spec.inputs]
    if given:
        shapes = [tuple(x.shape) for x in given]
    elif spec.input_shape is not None:
        shapes = [spec.input_shape]
    else:
        shapes = [tuple(node.meta["val"].shape) for node in program.graph.nodes
                  if node.op == "placeholder" and node.name in program.graph_signature.user_inputs]
    if not shapes:
        raise ModelError(f"{path}: cannot tell its input shape; pass --input-shape", stage="model")
    inputs = given or [make_input(tuple(int(d) for d in s), spec.seed + i)
                       for i, s in enumerate(shapes)]
    digest = hashlib.sha256(path.read_bytes())
    digest.update(repr(shapes).encode())
    return LoadedModel(name=path.name, program=program, inputs=inputs,
                       identity=digest.hexdigest())
