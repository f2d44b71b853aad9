"""Models from files: a saved `torch.export` program (`.pt2`), with the shapes it was saved with."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping

import numpy as np

from hostkit.errors import ModelError
from hostkit.models.base import LoadedModel, ModelSpec, make_input, split_named
from hostkit.models.inputs import read_input

__all__ = ["load_program_file"]


def load_program_file(spec: ModelSpec) -> LoadedModel:
    import torch

    path = Path(spec.name)
    if not path.is_file():
        raise ModelError(f"model file {path} not found", stage="model")
    from hostkit.models.detection import nms_op
    from hostkit.models.pt2e import register_quantized_ops

    register_quantized_ops()
    nms_op()  # a detector saved through `exportable()` calls edgekit::nms_by_class
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise ModelError(f"{path} is not a saved ExportedProgram (torch.export.save): "
                         f"{str(exc).splitlines()[0][:200]}", stage="model") from exc
    placeholders = [node for node in program.graph.nodes if node.op == "placeholder"
                    and node.name in program.graph_signature.user_inputs]
    if not placeholders:
        raise ModelError(f"{path}: the saved program takes no inputs, so there is nothing to feed "
                         "it; export the model with example inputs", stage="model")
    saved = [tuple(node.meta["val"].shape) for node in placeholders]
    names = [node.name for node in placeholders]
    given = _given_inputs(spec, path, names)
    if given and len(given) != len(saved):
        raise ModelError(f"{path} takes {len(saved)} inputs ({', '.join(names)}); got "
                         f"{len(given)} --input files", stage="model")
    if given:
        shapes = [tuple(x.shape) for x in given]
    elif spec.named_shapes:
        by_name = dict(spec.named_shapes)
        _known(by_name, names, path, "--input-shape")
        shapes = [by_name.get(name, want) for name, want in zip(names, saved)]
    elif spec.input_shape is not None:
        shapes = [spec.input_shape]
    else:
        shapes = saved
    if len(shapes) != len(saved):
        raise ModelError(f"{path} takes {len(saved)} inputs "
                         f"({', '.join(n.name for n in placeholders)}); --input-shape gives one "
                         "shape: pass one --input FILE per input instead", stage="model")
    for i, (shape, want) in enumerate(zip(shapes, saved)):
        static = all(isinstance(d, int) for d in want)
        if static and tuple(shape) != tuple(want):
            raise ModelError(f"{path}: input {i} ({placeholders[i].name}) was saved with shape "
                             f"{tuple(want)}; got {tuple(shape)} (export it again for that shape, "
                             "or with dynamic dimensions)", stage="model")
    inputs = given or [make_input(tuple(int(d) for d in s), spec.seed + i)
                       for i, s in enumerate(shapes)]
    digest = hashlib.sha256(path.read_bytes())
    digest.update(repr(shapes).encode())
    return LoadedModel(name=path.name, program=program, inputs=inputs,
                       identity=digest.hexdigest())


def _known(given: Mapping[str, object], names: list[str], path: Path, flag: str) -> None:
    unknown = [name for name in given if name not in names]
    if unknown:
        raise ModelError(f"{flag} {unknown[0]}=...: {path} has no input named {unknown[0]}; its "
                         f"inputs are {', '.join(names)}", stage="model")


def _given_inputs(spec: ModelSpec, path: Path, names: list[str]) -> list[np.ndarray]:
    """The --input tensors in the program's input order; NAME=FILE entries go to their input."""
    entries = [split_named(entry) for entry in spec.inputs]
    if not any(name for name, _ in entries):
        return [read_input(Path(file), path.name, None) for _, file in entries]
    if not all(name for name, _ in entries):
        raise ModelError("--input: name every input (NAME=FILE) or none", stage="model")
    by_name = {name: file for name, file in entries if name}
    _known(by_name, names, path, "--input")
    missing = [name for name in names if name not in by_name]
    if missing:
        raise ModelError(f"--input: {path} also takes {', '.join(missing)}; give NAME=FILE for "
                         "each input", stage="model")
    return [read_input(Path(by_name[name]), path.name, None) for name in names]
