"""The baseline engines edgekit measures beside TVM, defined once: their names, and the wheels a
board installs for each.

Every stage needs the names (the CLI parses `--baselines`, the run measures, the report lays out
columns, the fleet and the emulated board install), so they live here, below all of them. A
board's engines are pinned to the host's versions where the host has them, like TVM, so the
device runs what the host's check was made with.

torch needs a CPU build on a board: PyPI's Linux wheels of torch (aarch64 too) require CUDA's
libraries, several GB that a board without a GPU cannot use, so torch comes from PyTorch's CPU
index without dependencies, and its own pure-Python dependencies from PyPI.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import metadata

__all__ = ["ENGINES", "WheelSet", "parse_engines", "board_wheels", "TORCH_CPU_INDEX"]

ENGINES = ("torch", "onnxruntime")
ALIASES = {"pytorch": "torch", "ort": "onnxruntime"}
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# torch's requirements that exist only for its CUDA build.
_GPU_ONLY = re.compile(r"^(nvidia-|cuda-|triton)")
# torch's own dependencies when the host has no torch to read them from.
_TORCH_DEPS = ("filelock", "typing-extensions", "sympy", "networkx", "jinja2", "fsspec")


def parse_engines(text: str) -> tuple[str, ...]:
    """`torch,onnxruntime` -> the engines in that order; ValueError names an unknown one."""
    engines: list[str] = []
    for raw in text.split(","):
        name = raw.strip().lower()
        if not name:
            continue
        name = ALIASES.get(name, name)
        if name not in ENGINES:
            raise ValueError(f"unknown baseline engine {raw.strip()!r}: choose from "
                             f"{', '.join(ENGINES)} (comma-separated)")
        if name not in engines:
            engines.append(name)
    if not engines:
        raise ValueError(f"no baseline engine given: choose from {', '.join(ENGINES)}")
    return tuple(engines)


@dataclass(frozen=True)
class WheelSet:
    """Requirements fetched and installed together, with their own pip options."""

    requirements: tuple[str, ...]
    no_deps: bool = False
    index_url: str | None = None

    def download_args(self) -> list[str]:
        return [*(["--no-deps"] if self.no_deps else []),
                *(["--index-url", self.index_url] if self.index_url else []),
                *self.requirements]

    def install_args(self) -> list[str]:
        return [*(["--no-deps"] if self.no_deps else []), *self.requirements]


def _host_version(dist: str) -> str | None:
    try:
        return metadata.version(dist).split("+", 1)[0]
    except metadata.PackageNotFoundError:
        return None


def board_wheels(engines: tuple[str, ...]) -> list[WheelSet]:
    """What a board installs for the engines, pinned to the host's versions where it has them."""
    sets: list[WheelSet] = []
    if "onnxruntime" in engines:
        ort = _host_version("onnxruntime")
        sets.append(WheelSet((f"onnxruntime=={ort}" if ort else "onnxruntime",)))
    if "torch" in engines:
        version = _host_version("torch")
        pinned = f"torch=={version}+cpu" if version else "torch"
        sets.append(WheelSet((pinned,), no_deps=True, index_url=TORCH_CPU_INDEX))
        try:
            requires = metadata.requires("torch") or []
        except metadata.PackageNotFoundError:
            requires = []
        deps = tuple(r.partition(";")[0].strip() for r in requires
                     if "extra ==" not in r and not _GPU_ONLY.match(r))
        sets.append(WheelSet(deps or _TORCH_DEPS))
    return sets
