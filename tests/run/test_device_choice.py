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


def test_an_rpc_error_keeps_the_devices_own_line() -> None:
    """TVM's RPC client puts 'Error caught from RPC call:' above what the device raised; that
    wrapper line alone once was the whole message ('inference failed: RPCError: Error caught
    from RPC call:'). The text below is what a daemon answered to a bad artifact name."""
    from hostkit.errors import first_line

    text = ("RPCError: Error caught from RPC call:\n"
            "artifact upload-test: unknown format, expected one of ('.so', '.tar')")
    assert first_line(RuntimeError(text)).startswith("artifact upload-test: unknown format")
    mismatch = ("RPCError: Error caught from RPC call:\nTraceback (most recent call last):\n"
                "  File \"vm.cc\", line 3\nValueError: Mismatched x.device_type on argument #0 "
                "when calling: `main(x)`, expected cuda")
    assert first_line(RuntimeError(mismatch)).startswith("ValueError: Mismatched x.device_type")
    assert first_line(RuntimeError("RPCError: Error caught from RPC call:")) == \
        "RPCError: Error caught from RPC call:", "nothing below it: the wrapper is all there is"
