"""The layout's rule, checked: hostkit's stages import one way and nothing imports the CLI.

Every `hostkit` import in the source (lazy ones inside functions included) is an edge from the
importing module's stage to the imported module's stage. A stage may import its own folder and the
stages below it, never one above or beside it, and the modules form no import cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

HOSTKIT = Path(__file__).resolve().parent.parent / "hostkit"

# Lower ranks sit below higher ones. Foundation: the root modules every stage reads.
RANKS = {
    "foundation": 0,
    "models": 1, "report": 1,
    "build": 2, "boards": 2,
    "transport": 3, "export": 3,
    "run": 4, "fleet": 4,
    "cli": 5,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(HOSTKIT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _stage(module: str) -> str:
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in RANKS:
        return parts[1]
    return "foundation"


def _imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(HOSTKIT.rglob("*.py")):
        module = _module_name(path)
        edges = graph.setdefault(module, set())
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "hostkit":
                    edges.update(f"hostkit.{alias.name}" for alias in node.names)
                elif node.module.startswith("hostkit."):
                    edges.add(node.module)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.startswith("hostkit."))
    return graph


def test_every_folder_says_what_it_owns() -> None:
    for init in HOSTKIT.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and len(doc) > 80, f"{init.relative_to(HOSTKIT.parent)} needs its paragraph"


def test_stages_import_downwards_only() -> None:
    wrong = []
    for module, targets in _imports().items():
        for target in targets:
            here, there = _stage(module), _stage(target)
            if target == "hostkit.__version__" or here == there:
                continue
            if there == "cli" or RANKS[there] >= RANKS[here]:
                wrong.append(f"{module} -> {target} ({here} may not import {there})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles() -> None:
    imports = _imports()
    graph = {m: {t for t in ts if t in imports} for m, ts in imports.items()}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(target):] + [target])
                            if target in path else f"import cycle through {target}")
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_device_side_never_imports_the_host() -> None:
    """The device side needs only TVM and numpy. The one exception is the optional baseline
    engine (issue 13): `devicekit/baselines.py` may import torch inside a function, run only
    when the host asks for that engine, so a board without torch still serves; and
    `devicekit/torch_ops.py`, edgekit's NMS operator that a detector's program holds, may import
    torch and torchvision inside a function, run only when such a program is loaded."""
    devicekit = HOSTKIT.parent / "devicekit"
    for path in devicekit.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        lazy = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                for n in ast.walk(f)} if path.name in ("baselines.py", "torch_ops.py") else set()
        vision = path.name == "torch_ops.py"
        for node in ast.walk(tree):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            allowed = ({"torch", "torchvision"} if vision else {"torch"}) \
                if id(node) in lazy else set()
            banned = {"hostkit", "torchvision", "torch"} - allowed
            assert not any(n.split(".")[0] in banned for n in names), \
                f"{path.name} imports {names}: the device side needs only TVM and numpy"
