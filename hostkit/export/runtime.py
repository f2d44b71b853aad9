"""TVM's C++ runtime for a device's architecture, taken from the apache-tvm wheels.

A bundle ships `libtvm_runtime.so` (the Relax VM and the CPU device) and `libtvm_ffi.so` (the
calling convention and module loader it sits on), so the board needs neither Python nor TVM. For
this machine's own architecture they are the installed wheels' files; for another one they come
from the same versions' wheels for that platform, downloaded once with pip (no install, no
dependencies) and kept under the cache. The headers the runner compiles against are the installed
tvm_ffi wheel's: they are the same for every architecture.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from devicekit.info import elf_machine
from hostkit.boards.image import WHEEL_PLATFORM
from hostkit.build.targets import arch_of_triple
from hostkit.defaults import cache_dir
from hostkit.errors import ExportError

__all__ = ["Runtime", "RUNTIME_LIBS", "runtime_for", "check_runtime_exists", "tvm_versions",
           "WHEEL_PLATFORMS"]

# The wheel each library comes from, and its path inside that wheel.
RUNTIME_LIBS = {
    "libtvm_runtime.so": ("apache-tvm", "tvm/lib/libtvm_runtime.so"),
    "libtvm_ffi.so": ("apache-tvm-ffi", "tvm_ffi/lib/libtvm_ffi.so"),
}
# The platforms apache-tvm publishes Linux wheels for; armv7 and riscv64 have none.
WHEEL_PLATFORMS = {"aarch64": WHEEL_PLATFORM, "x86_64": "manylinux_2_28_x86_64"}
PIP_TIMEOUT_S = 600


@dataclass(frozen=True)
class Runtime:
    """The runtime libraries for one architecture, and the headers to build against them."""

    arch: str
    libs: tuple[Path, ...]
    include: Path
    source: str  # where the libraries came from, for the manifest: "installed" or the wheels


def tvm_versions() -> dict[str, str]:
    return {package: metadata.version(package) for package in ("apache-tvm", "apache-tvm-ffi")}


def _installed(package: str, relative: str) -> Path:
    """A file of an installed wheel, found through its metadata (no import of TVM needed)."""
    path = Path(str(metadata.distribution(package).locate_file(relative)))
    if not path.exists():
        raise ExportError(f"the installed {package} has no {relative}", stage="runtime",
                          hint=f"reinstall it: pip install --force-reinstall {package}")
    return path


def check_runtime_exists(arch: str, device: str | None = None) -> None:
    """An ExportError, before anything is fetched or compiled, for an architecture that has
    neither this machine's runtime nor a wheel to take one from."""
    if arch != arch_of_triple(platform.machine()) and arch not in WHEEL_PLATFORMS:
        raise ExportError(f"apache-tvm publishes no wheel for {arch}, so edgekit has no TVM "
                          f"runtime to ship for it", device=device, stage="runtime",
                          hint="build libtvm_runtime.so for that board from TVM's source, or "
                               "export for an aarch64 or x86_64 device")


def runtime_for(arch: str, device: str | None = None) -> Runtime:
    """The runtime for `arch` (aarch64, x86_64, ...); another architecture's is fetched once."""
    include = _installed("apache-tvm-ffi", "tvm_ffi/include")
    if arch == arch_of_triple(platform.machine()):
        libs = tuple(_installed(pkg, rel) for pkg, rel in RUNTIME_LIBS.values())
        return Runtime(arch=arch, libs=libs, include=include, source="installed wheels")
    versions = tvm_versions()
    folder = (cache_dir() / "runtimes" / f"tvm-{versions['apache-tvm']}"
              f"-ffi-{versions['apache-tvm-ffi']}" / arch)
    libs = tuple(folder / name for name in RUNTIME_LIBS)
    if not all(lib.is_file() for lib in libs):
        _fetch(arch, folder, versions, device)
    source = ", ".join(f"{pkg}=={ver} ({WHEEL_PLATFORMS[arch]})" for pkg, ver in versions.items())
    return Runtime(arch=arch, libs=libs, include=include, source=source)


def _fetch(arch: str, folder: Path, versions: dict[str, str], device: str | None) -> None:
    """Download the two wheels for arch's platform and keep only the runtime libraries."""
    check_runtime_exists(arch, device)
    wheel_platform = WHEEL_PLATFORMS[arch]
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{arch}.", dir=folder.parent))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--only-binary=:all:", "--platform", wheel_platform,
               "--python-version", f"{sys.version_info.major}.{sys.version_info.minor}",
               "--dest", str(work / "wheels"),
               *(f"{pkg}=={ver}" for pkg, ver in versions.items())]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S,
                                  stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired as exc:
            raise ExportError(f"downloading the {arch} TVM wheels took over {PIP_TIMEOUT_S}s",
                              device=device, stage="runtime") from exc
        if done.returncode != 0:
            errors = [ln for ln in done.stderr.splitlines() if "ERROR" in ln] or ["(no output)"]
            raise ExportError(f"pip could not download the {arch} TVM wheels "
                              f"({', '.join(versions)}): {errors[-1].strip()[:300]}",
                              device=device, stage="runtime",
                              hint="check that pip reaches a package index")
        wheels = sorted((work / "wheels").glob("*.whl"))
        for name, (package, inside) in RUNTIME_LIBS.items():
            prefix = package.replace("-", "_") + "-"
            wheel = next((w for w in wheels if w.name.startswith(prefix)), None)
            if wheel is None:
                raise ExportError(f"pip downloaded no {package} wheel for {arch}",
                                  device=device, stage="runtime")
            with zipfile.ZipFile(wheel) as archive:
                try:
                    data = archive.read(inside)
                except KeyError as exc:
                    raise ExportError(f"{wheel.name} has no {inside}", device=device,
                                      stage="runtime") from exc
            if elf_machine(data[:64]) != arch:
                raise ExportError(f"{inside} in {wheel.name} is built for "
                                  f"{elf_machine(data[:64])}, not {arch}", device=device,
                                  stage="runtime")
            (work / name).write_bytes(data)
            os.chmod(work / name, 0o755)
        shutil.rmtree(work / "wheels")
        if folder.exists():  # a concurrent export fetched it first
            shutil.rmtree(folder)
        os.replace(work, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
