"""What a device reports about itself: the host reads it before every deploy."""

from __future__ import annotations

import os
import platform
import socket
from typing import Any

from devicekit import __version__

__all__ = ["device_info", "elf_machine", "compute_threads", "ELF_MACHINES"]

# e_machine values of the ELF header, named as `uname -m` names the architecture.
ELF_MACHINES = {3: "i386", 40: "armv7l", 62: "x86_64", 183: "aarch64", 243: "riscv64"}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware", "CPU part"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def compute_threads() -> int:
    """The threads a model's kernels should run on: one per physical core this process may use.

    TVM's own default halves the logical CPUs on x86 (it assumes two hyper-threads per core), so
    on a 2-core VM, or any x86 board without hyper-threading, it ran every kernel on half the
    cores (measured: untuned ResNet-18 56.6 ms on 1 thread, 28.5 ms on 2) while PyTorch and ONNX
    Runtime were given them all. Counting cores from the kernel's topology (one per distinct
    package and core id) gives both kinds of machine their real core count; where the topology
    cannot be read, every CPU this process may run on counts."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{topology}/physical_package_id", encoding="ascii") as package, \
                    open(f"{topology}/core_id", encoding="ascii") as core:
                cores.add((package.read().strip(), core.read().strip()))
        except OSError:
            return len(cpus) or 1
    return len(cores) or len(cpus) or 1


def tvm_threads() -> int:
    """The threads TVM's thread pool runs kernels on in this process (it reads
    `TVM_NUM_THREADS` when its pool starts: `edgekit-device` sets it to `compute_threads()`)."""
    import tvm

    try:
        return int(tvm.get_global_func("runtime.NumThreads")())
    except Exception:  # a TVM without the function
        return int(os.environ.get("TVM_NUM_THREADS") or 0)


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def memory_available_bytes() -> int:
    """What a new model may take without swapping (0 unknown): the machine's MemAvailable, or
    less when this process runs in a memory cgroup (a container) with a limit."""
    available = 0
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    room = _cgroup_room()
    if room is not None:
        available = min(available, room) if available else room
    return available


def _cgroup_room() -> int | None:
    """Limit minus usage of this process's memory cgroup (v1 or v2), None when unlimited."""
    try:
        with open("/proc/self/cgroup", encoding="ascii") as groups:
            lines = groups.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            folder, files = f"/sys/fs/cgroup/memory{path}", ("memory.limit_in_bytes",
                                                             "memory.usage_in_bytes")
        elif controllers == "" and path != "/":
            folder, files = f"/sys/fs/cgroup{path}", ("memory.max", "memory.current")
        else:
            continue
        try:
            with open(os.path.join(folder, files[0]), encoding="ascii") as limit_file:
                limit_text = limit_file.read().strip()
            with open(os.path.join(folder, files[1]), encoding="ascii") as usage_file:
                usage = int(usage_file.read().strip())
        except (OSError, ValueError):
            continue
        if limit_text == "max" or int(limit_text) >= 1 << 60:
            continue  # no limit set
        return max(0, int(limit_text) - usage)
    return None


def process_memory() -> dict[str, int]:
    """This process's resident memory now and its peak so far, in bytes (Linux)."""
    import resource

    rss = 0
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"rss_bytes": rss, "peak_bytes": max(peak, rss)}


def _os_name() -> str:
    try:
        with open("/etc/os-release", encoding="utf-8") as release:
            for line in release:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return f"{platform.system()} {platform.release()}"


def device_info(with_gpus: bool = True) -> dict[str, Any]:
    """Describe this machine: the host checks TVM's version and picks tuning settings from it,
    and completes a CUDA target that names no arch from the first GPU. `with_gpus` asks the GPUs,
    which initialises CUDA in this process (a daemon's session, never the daemon itself)."""
    import tvm  # lazily: `edgekit-device --help` must not pay for TVM's import

    from devicekit.runtime import gpus, runtime_only

    return {
        "hostname": socket.gethostname(),
        "arch": platform.machine(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count() or 1,
        "tvm_threads": tvm_threads(),
        "memory_bytes": _memory_bytes(),
        "memory_available_bytes": memory_available_bytes(),
        "os": _os_name(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "tvm_version": tvm.__version__,
        "tvm_runtime_only": runtime_only(),
        "gpus": gpus() if with_gpus else [],
        "edgekit_version": __version__,
    }


def elf_machine(header: bytes) -> str | None:
    """The architecture an ELF file is built for, or None if the bytes are not an ELF header."""
    if len(header) < 20 or header[:4] != b"\x7fELF":
        return None
    code = int.from_bytes(header[18:20], "little" if header[5] == 1 else "big")
    return ELF_MACHINES.get(code, f"e_machine={code}")
