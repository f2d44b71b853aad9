"""What a device reports about itself: the host reads it before every deploy."""

from __future__ import annotations

import os
import platform
import socket
from typing import Any

from devicekit import __version__

__all__ = ["device_info", "elf_machine", "ELF_MACHINES"]

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


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def _os_name() -> str:
    try:
        with open("/etc/os-release", encoding="utf-8") as release:
            for line in release:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return f"{platform.system()} {platform.release()}"


def device_info() -> dict[str, Any]:
    """Describe this machine: the host checks TVM's version and picks tuning settings from it."""
    import tvm  # lazily: `edgekit-device --help` must not pay for TVM's import

    return {
        "hostname": socket.gethostname(),
        "arch": platform.machine(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count() or 1,
        "memory_bytes": _memory_bytes(),
        "os": _os_name(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "tvm_version": tvm.__version__,
        "edgekit_version": __version__,
    }


def elf_machine(header: bytes) -> str | None:
    """The architecture an ELF file is built for, or None if the bytes are not an ELF header."""
    if len(header) < 20 or header[:4] != b"\x7fELF":
        return None
    code = int.from_bytes(header[18:20], "little" if header[5] == 1 else "big")
    return ELF_MACHINES.get(code, f"e_machine={code}")
