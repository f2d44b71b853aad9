"""The TVM adapter for running: one RPC session's view of a device's daemon.

Outputs come back through the Relax VM's stateful API (`set_input`, `invoke_stateful`,
`get_outputs`), because a tuple returned over RPC is an opaque handle. Latency is measured on the
device with `time_evaluator`, one inference per sample, so the network never enters the figures.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager

import numpy as np

from hostkit.errors import ConnectError, RemoteError, first_line
from hostkit.transport.base import Progress, Transport, watch_of
from hostkit.transport.watch import Watch

if TYPE_CHECKING:
    from tvm.rpc import RPCSession

__all__ = ["DeviceSession", "LoadedRemote", "check_versions"]


def check_versions(device: str, info: dict[str, Any]) -> None:
    """Refuse a device whose TVM differs from the host's: the runtime ABI must match exactly."""
    import tvm

    theirs = info.get("tvm_version")
    if theirs != tvm.__version__:
        raise ConnectError(f"TVM version mismatch: host has {tvm.__version__}, device has {theirs}",
                           device=device, stage="connect", transient=False,
                           hint=f"install apache-tvm=={tvm.__version__} on the device, e.g. "
                                f"`edgekit device install --device {device}`")


class DeviceSession:
    def __init__(self, transport: Transport, sess: "RPCSession") -> None:
        self.transport = transport
        self.sess = sess
        self.name = transport.device.name
        self.watch = watch_of(sess)

    def stage(self, name: str) -> ContextManager[None]:
        """Guard one blocking call: a stalled or vanished device fails it (see `Watch`)."""
        return self.watch.stage(name) if self.watch is not None else nullcontext()

    def info(self) -> dict[str, Any]:
        try:
            with self.stage("connect"):
                raw = self.sess.get_function("edgekit.device_info")()
        except RemoteError:
            raise
        except Exception as exc:
            raise ConnectError(f"{self.transport.address} answers RPC but is not an edgekit daemon "
                               f"({first_line(exc)})", device=self.name, stage="connect", transient=False,
                               hint="start it with `edgekit-device serve`") from exc
        try:
            info = json.loads(raw)
        except (TypeError, ValueError):
            info = None
        if not isinstance(info, dict) or not isinstance(info.get("tvm_version"), str):
            shown = repr(raw)[:80]
            raise ConnectError(f"{self.transport.address} answered edgekit.device_info with "
                               f"{shown}, not an edgekit device report (an old or foreign "
                               "daemon?)", device=self.name, stage="connect", transient=False,
                               hint="install the host's edgekit on the device, e.g. "
                                    f"`edgekit device install --device {self.name}`")
        return info

    def memory(self) -> dict[str, int] | None:
        """The session process's resident memory and peak on the device (None: an older daemon)."""
        try:
            with self.stage("memory"):
                raw = self.sess.get_function("edgekit.memory")()
        except RemoteError:
            raise
        except Exception:
            return None
        memory: dict[str, int] = json.loads(raw)
        return memory

    def has_artifact(self, sha256: str) -> bool:
        with self.stage("upload"):
            return bool(self.sess.get_function("edgekit.artifact_has")(sha256))

    def ensure_artifact(self, path: Path, sha256: str,
                        progress: Progress | None = None) -> tuple[bool, float]:
        """Send the artifact unless the device holds it already; returns (sent, seconds)."""
        if self.has_artifact(sha256):
            return False, 0.0
        start = time.perf_counter()
        with self.stage("upload"):
            self.transport.put_artifact(self.sess, path, sha256, progress)
        return True, time.perf_counter() - start

    def load(self, sha256: str, target_kind: str = "llvm") -> "LoadedRemote":
        """Load an artifact on the device, on the device kind its target was built for."""
        from tvm import relax

        with self.stage("load"):
            try:
                if device_type_for(target_kind) != 1:
                    self._use_device(target_kind)
                lib_path = self.sess.get_function("edgekit.artifact_path")(sha256)
                module = self.sess.load_module(lib_path)
                dev = self.sess.device(device_type_for(target_kind), 0)
                vm = relax.VirtualMachine(module, dev)
            except Exception as exc:
                raise RemoteError(f"loading the model on the device failed: "
                                  f"{_device_error(exc)}", device=self.name, stage="load") from exc
        return LoadedRemote(vm=vm, dev=dev, device=self.name, watch=self.watch)

    @property
    def lost(self) -> bool:
        """The session is gone (stalled, or the daemon closed it): nothing more can run on it."""
        return self.watch is not None and self.watch.relay.closed

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
        if self.watch is not None:
            self.watch.close()


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


# A benchmark runs in chunks of about this share of stall_timeout each, so a device that stops
# is caught within stall_timeout while one that keeps answering may run as long as it needs.
CHUNK_SHARE = 0.25


@dataclass
class LoadedRemote:
    vm: Any
    dev: Any
    device: str
    watch: Watch | None = None
    first_ms: float | None = None
    cut: tuple[int, int] | None = None  # (runs timed, runs asked) when session_timeout cut them

    def _stage(self, name: str, window: float | None = None) -> ContextManager[None]:
        return self.watch.stage(name, window) if self.watch is not None else nullcontext()

    def run(self, inputs: list[np.ndarray]) -> tuple[list[np.ndarray], float]:
        """Outputs and the wall time of this call in ms (the first call includes lazy set-up)."""
        import tvm

        # Its length is unknown until it ends (an untuned detector takes minutes): the user's
        # session_timeout bounds it; the benchmark after it is stall-timed from its length.
        long_step = self.watch.session_timeout if self.watch is not None else None
        with self._stage("first inference", long_step):
            try:
                tensors = [tvm.runtime.tensor(x, self.dev) for x in inputs]
                self.vm.set_input("main", *tensors)
                start = time.perf_counter()
                self.vm.invoke_stateful("main")
                elapsed_ms = (time.perf_counter() - start) * 1e3
                outputs = self.vm.get_outputs("main")
                arrays = [o.numpy() for o in _flatten(outputs)]
            except Exception as exc:
                raise RemoteError(f"inference failed: {_device_error(exc)}", device=self.device,
                                  stage="run") from exc
        self.first_ms = elapsed_ms
        return arrays, elapsed_ms

    def benchmark(self, repeat: int, warmup: int) -> list[float]:
        """Per-inference latencies in ms, timed on the device; `warmup` runs are discarded.

        Each sample is one inference (`number=1`) whichever chunk timed it, so the figures are
        those of one long `time_evaluator` call; chunks only bound each RPC call's length.
        Runs that would take the session past its session_timeout (the daemon would end it)
        are not started: `self.cut` then says how many ran of how many asked.
        """
        per_run_s = max((self.first_ms or 1.0) / 1e3, 1e-6)
        if self.watch is not None and self.watch.timed_session:
            # half the time left, so the runs that follow (profile, memory) fit too
            left = self.watch.session_timeout - (time.monotonic() - self.watch.started)
            fits = int(0.5 * left / per_run_s) - 1  # time_evaluator's untimed run
            if fits < repeat + warmup:
                warmup = min(warmup, max(0, fits - 1))
                self.cut = (max(1, fits - warmup), repeat)
                repeat = self.cut[0]
        total = repeat + warmup
        target_s = self.watch.stall_timeout * CHUNK_SHARE if self.watch else float("inf")
        samples: list[float] = []
        timers: dict[int, Any] = {}
        while len(samples) < total:
            chunk = max(1, min(total - len(samples), int(target_s / per_run_s)))
            start = time.perf_counter()
            # A chunk of one run slower than stall_timeout reports nothing until it ends.
            with self._stage("benchmark", 2.5 * per_run_s * (chunk + 1)):
                try:
                    if chunk not in timers:
                        timers[chunk] = self.vm.time_evaluator("invoke_stateful", self.dev,
                                                               number=1, repeat=chunk)
                    results = list(timers[chunk]("main").results)
                except Exception as exc:
                    raise RemoteError(f"benchmark failed: {_device_error(exc)}",
                                      device=self.device, stage="bench") from exc
            samples.extend(results)
            if self.watch is not None:
                self.watch.progress()
            # time_evaluator runs once untimed before its samples; at most 4x growth per chunk.
            took = (time.perf_counter() - start) / (chunk + 1)
            per_run_s = max(took, per_run_s / 4, 1e-6)
        return [r * 1e3 for r in samples[warmup:]]

    def kernel_times(self, sess: "RPCSession", runs: int) -> dict[str, Any]:
        """Each VM call's time on the device over `runs` inferences, timed by the daemon's
        instrument around every call the VM makes (TVM 0.27 has no VM profiler of its own)."""
        with self._stage("profile", self.watch.session_timeout if self.watch else None):
            try:
                take = sess.get_function("edgekit.profile_take")
                sess.get_function("edgekit.profile_attach")(self.vm.module)
                self.vm.invoke_stateful("main")  # the instrument's first calls, untimed
                take()
                for _ in range(runs):
                    self.vm.invoke_stateful("main")
                    if self.watch is not None:
                        self.watch.progress()
                raw: dict[str, Any] = json.loads(take())
            except Exception as exc:
                raise RemoteError(f"profiling failed: {_device_error(exc)}", device=self.device,
                                  stage="profile") from exc
        return raw


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in _flatten(item)]
    return [value]
