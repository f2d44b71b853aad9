"""The TVM adapter for running: one RPC session's view of a device's daemon.

Outputs come back through the Relax VM's stateful API (`set_input`, `invoke_stateful`,
`get_outputs`), because a tuple returned over RPC is an opaque handle. Latency is measured on the
device with `time_evaluator`, one inference per sample, so the network never enters the figures.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hostkit.errors import ConnectError, RemoteError, first_line
from hostkit.transport.base import Progress, Transport

if TYPE_CHECKING:
    from tvm.rpc import RPCSession

__all__ = ["DeviceSession", "LoadedRemote", "check_versions"]


def check_versions(device: str, info: dict[str, Any]) -> None:
    """Refuse a device whose TVM differs from the host's: the runtime ABI must match exactly."""
    import tvm

    theirs = info.get("tvm_version")
    if theirs != tvm.__version__:
        raise ConnectError(f"TVM version mismatch: host has {tvm.__version__}, device has {theirs}",
                           device=device, stage="connect",
                           hint=f"install apache-tvm=={tvm.__version__} on the device, e.g. "
                                f"`edgekit device install --device {device}`")


class DeviceSession:
    def __init__(self, transport: Transport, sess: "RPCSession") -> None:
        self.transport = transport
        self.sess = sess
        self.name = transport.device.name

    def info(self) -> dict[str, Any]:
        try:
            raw = self.sess.get_function("edgekit.device_info")()
        except Exception as exc:
            raise ConnectError(f"{self.transport.address} answers RPC but is not an edgekit daemon "
                               f"({first_line(exc)})", device=self.name, stage="connect",
                               hint="start it with `edgekit-device serve`") from exc
        try:
            info = json.loads(raw)
        except (TypeError, ValueError):
            info = None
        if not isinstance(info, dict) or not isinstance(info.get("tvm_version"), str):
            shown = repr(raw)[:80]
            raise ConnectError(f"{self.transport.address} answered edgekit.device_info with "
                               f"{shown}, not an edgekit device report (an old or foreign "
                               "daemon?)", device=self.name, stage="connect",
                               hint="install the host's edgekit on the device, e.g. "
                                    f"`edgekit device install --device {self.name}`")
        return info

    def memory(self) -> dict[str, int] | None:
        """The session process's resident memory and peak on the device (None: an older daemon)."""
        try:
            raw = self.sess.get_function("edgekit.memory")()
        except Exception:
            return None
        memory: dict[str, int] = json.loads(raw)
        return memory

    def has_artifact(self, sha256: str) -> bool:
        return bool(self.sess.get_function("edgekit.artifact_has")(sha256))

    def ensure_artifact(self, path: Path, sha256: str,
                        progress: Progress | None = None) -> tuple[bool, float]:
        """Send the artifact unless the device holds it already; returns (sent, seconds)."""
        if self.has_artifact(sha256):
            return False, 0.0
        start = time.perf_counter()
        self.transport.put_artifact(self.sess, path, sha256, progress)
        return True, time.perf_counter() - start

    def load(self, sha256: str, target_kind: str = "llvm") -> "LoadedRemote":
        """Load an artifact on the device, on the device kind its target was built for."""
        from tvm import relax

        try:
            if device_type_for(target_kind) != 1:
                self._use_device(target_kind)
            lib_path = self.sess.get_function("edgekit.artifact_path")(sha256)
            module = self.sess.load_module(lib_path)
            dev = self.sess.device(device_type_for(target_kind), 0)
            vm = relax.VirtualMachine(module, dev)
        except Exception as exc:
            raise RemoteError(f"loading the model on the device failed: {_device_error(exc)}",
                              device=self.name, stage="load") from exc
        return LoadedRemote(vm=vm, dev=dev, device=self.name)

    def _use_device(self, kind: str) -> None:
        """Have the daemon load TVM's runtime for an accelerator (a daemon older than this
        function loaded what its TVM loads by itself)."""
        try:
            use = self.sess.get_function("edgekit.use_device")
        except Exception:
            return
        use(kind)

    def close(self) -> None:
        """End the RPC session now: TVM's daemon serves one session at a time.

        TVM has no explicit close; the session ends when its last handle is freed, and remote
        functions, devices and modules all hold one, some in reference cycles.
        """
        import gc

        if self.sess is not None:
            self.sess._remote_funcs.clear()
            self.sess = None
        gc.collect()


# Target kinds that run on an accelerator, and TVM's device type for each (runtime/device.h).
# A module loaded over RPC reports no imports, so the target, not the module, says where to run.
DEVICE_TYPES = {"cuda": 2, "rocm": 10, "vulkan": 7, "opencl": 4, "metal": 8}


def device_type_for(target_kind: str) -> int:
    """TVM's device type for a target kind: its accelerator, or the CPU (1) for llvm and c."""
    return DEVICE_TYPES.get(target_kind, 1)


def _device_error(exc: BaseException) -> str:
    text = str(exc)
    for line in text.splitlines():
        if "edgekit:" in line:
            return line.split("edgekit:", 1)[1].strip()
    return first_line(exc)


@dataclass
class LoadedRemote:
    vm: Any
    dev: Any
    device: str

    def run(self, inputs: list[np.ndarray]) -> tuple[list[np.ndarray], float]:
        """Outputs and the wall time of this call in ms (the first call includes lazy set-up)."""
        import tvm

        try:
            tensors = [tvm.runtime.tensor(x, self.dev) for x in inputs]
            self.vm.set_input("main", *tensors)
            start = time.perf_counter()
            self.vm.invoke_stateful("main")
            elapsed_ms = (time.perf_counter() - start) * 1e3
            outputs = self.vm.get_outputs("main")
        except Exception as exc:
            raise RemoteError(f"inference failed: {_device_error(exc)}", device=self.device,
                              stage="run") from exc
        return [o.numpy() for o in _flatten(outputs)], elapsed_ms

    def benchmark(self, repeat: int, warmup: int) -> list[float]:
        """Per-inference latencies in ms, timed on the device; `warmup` runs are discarded."""
        try:
            timer = self.vm.time_evaluator("invoke_stateful", self.dev, number=1,
                                           repeat=repeat + warmup)
            results = list(timer("main").results)
        except Exception as exc:
            raise RemoteError(f"benchmark failed: {_device_error(exc)}", device=self.device,
                              stage="bench") from exc
        return [r * 1e3 for r in results[warmup:]]


    def kernel_times(self, sess: "RPCSession", runs: int) -> dict[str, Any]:
        """Each VM call's time on the device over `runs` inferences, timed by the daemon's
        instrument around every call the VM makes (TVM 0.27 has no VM profiler of its own)."""
        try:
            take = sess.get_function("edgekit.profile_take")
            sess.get_function("edgekit.profile_attach")(self.vm.module)
            take()
            for _ in range(runs):
                self.vm.invoke_stateful("main")
            raw: dict[str, Any] = json.loads(take())
        except Exception as exc:
            raise RemoteError(f"profiling failed: {_device_error(exc)}", device=self.device,
                              stage="profile") from exc
        return raw


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in _flatten(item)]
    return [value]
