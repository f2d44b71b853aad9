"""Unit test: the device an artifact runs on follows its target, not the loaded module (a module
loaded over RPC reports no imports, so a CUDA library once ran its inputs on the CPU)."""

from __future__ import annotations

import pytest

from hostkit.run.remote import device_type_for


@pytest.mark.parametrize(("kind", "member"), [
    ("llvm", "kDLCPU"), ("c", "kDLCPU"), ("cuda", "kDLCUDA"), ("opencl", "kDLOpenCL"),
    ("vulkan", "kDLVulkan"), ("metal", "kDLMetal"), ("rocm", "kDLROCM"),
])
def test_device_type_follows_the_target_kind(kind: str, member: str) -> None:
    from tvm_ffi import DLDeviceType

    assert device_type_for(kind) == int(getattr(DLDeviceType, member))
