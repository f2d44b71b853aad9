"""Fixtures of the build tests: the CPU targets edgekit's hand-written kernels are built for, and
a tuned build's preparation of one of them."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def cpu_targets() -> list[Any]:
    """This machine's CPU, and a generic x86-64 one (16 vector registers, 256-bit vectors: the
    kernels' blocks come out smaller)."""
    import tvm
    from tvm.target import codegen

    return [tvm.target.Target({"kind": "llvm", "mcpu": str(codegen.llvm_get_system_cpu()),
                               "num-cores": 2}),
            tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 2})]


@pytest.fixture
def prepared_kernel(cpu_targets: list[Any]) -> Any:
    """`prepare(mod, name)`: `mod` as a tuned build prepares it for this machine, and the script
    of its one kernel named with `name`, which must come scheduled by hand (threads, vectors)
    and marked so, which keeps MetaSchedule from extracting it as a task."""
    def prepare(mod: Any, name: str) -> tuple[Any, str]:
        from tvm import tirx

        from hostkit.build.tuning.records import prepare_module

        prepared = prepare_module(mod, cpu_targets[0])
        kernels = [f for gv, f in prepared.functions.items()
                   if isinstance(f, tirx.PrimFunc) and name in gv.name_hint]
        assert len(kernels) == 1, [gv.name_hint for gv in prepared.functions]
        script = kernels[0].script()
        assert kernels[0].attrs["tirx.is_scheduled"]
        assert "T.parallel" in script and "T.vectorized" in script
        return prepared, script

    return prepare
