"""The C++ runner: its source, the compiler that builds it for a device, and the build itself.

The runner links against the bundle's own `libtvm_runtime.so` and `libtvm_ffi.so` with an rpath of
`$ORIGIN`, so it finds them beside itself wherever the bundle is unpacked. It is built with the
device's C++ compiler: `g++` for this machine's architecture, the cross `g++` that matches the
device's C cross compiler otherwise (`aarch64-linux-gnu-gcc` -> `aarch64-linux-gnu-g++`). The build
uses relative paths only and strips the binary, so the same inputs give the same bytes.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from devicekit.info import elf_machine
from hostkit.build.targets import CROSS_TOOLCHAINS, ResolvedTarget, arch_of_triple
from hostkit.errors import ExportError, TargetError
from hostkit.export.runtime import Runtime
from hostkit.inventory import Device

__all__ = ["RUNNER_SOURCE", "RUNNER_NAME", "cxx_for", "compiler_version", "build_runner",
           "build_command"]

RUNNER_SOURCE = Path(__file__).with_name("runner.cc")
RUNNER_NAME = "edgekit-runner"
BUILD_TIMEOUT_S = 300


def _cxx_name(c_compiler: str) -> str:
    """The C++ driver of the same toolchain as a C compiler."""
    for c, cxx in (("gcc", "g++"), ("clang", "clang++"), ("cc", "c++")):
        if c_compiler.endswith(c):
            return c_compiler[: -len(c)] + cxx
    return c_compiler


def cxx_for(device: Device, resolved: ResolvedTarget, c_compiler: str | None) -> str:
    """The C++ compiler that builds the runner for the device, checked like the C one is."""
    compiler = _cxx_name(c_compiler) if c_compiler else "g++"
    package = "g++"
    if resolved.is_cross:
        package = CROSS_TOOLCHAINS.get(resolved.arch, ("", "a C++ cross compiler"))[1]
        package = package.replace("gcc-", "g++-", 1)
    if shutil.which(compiler) is None:
        raise TargetError(f"C++ compiler {compiler} for the runner ({resolved.arch}) not found; "
                          f"install it with `apt-get install {package}`", device=device.name,
                          stage="toolchain")
    machine = _run([compiler, "-dumpmachine"], f"{compiler} -dumpmachine", device.name).strip()
    if arch_of_triple(machine) != resolved.arch:
        raise TargetError(f"{compiler} builds for {machine}, but {device.name} is "
                          f"{resolved.arch}; install {package} or set cross_compiler",
                          device=device.name, stage="toolchain")
    return compiler


def compiler_version(compiler: str) -> str:
    return _run([compiler, "--version"], f"{compiler} --version", None).splitlines()[0].strip()


def build_command(compiler: str, include: str) -> list[str]:
    """The one command that builds the runner in a bundle folder (the bundle's README shows it)."""
    return [compiler, "-std=c++17", "-O2", "-s", "-o", RUNNER_NAME, "runner.cc", "-I", include,
            "-L.", "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi", "-Wl,-rpath-link,.",
            "-Wl,-rpath,$ORIGIN"]


def build_runner(folder: Path, compiler: str, runtime: Runtime, device: str | None) -> Path:
    """Compile folder/runner.cc against the runtime libraries already in folder."""
    shutil.copyfile(RUNNER_SOURCE, folder / "runner.cc")
    _run(build_command(compiler, str(runtime.include)), f"building the runner with {compiler}",
         device, cwd=folder)
    binary = folder / RUNNER_NAME
    machine = elf_machine(binary.read_bytes()[:64])
    if machine != runtime.arch:
        raise ExportError(f"{compiler} built the runner for {machine}, not {runtime.arch}",
                          device=device, stage="runner")
    return binary


def _run(cmd: list[str], what: str, device: str | None, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False,
                              timeout=BUILD_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ExportError(f"{what} failed: {exc}", device=device, stage="runner") from exc
    if done.returncode != 0:
        lines = [ln.strip() for ln in (done.stdout + done.stderr).splitlines() if ln.strip()]
        errors = [ln for ln in lines if "error" in ln] or lines or ["(no output)"]
        raise ExportError(f"{what} failed with exit code {done.returncode}: {errors[0][:300]}",
                          device=device, stage="runner")
    return done.stdout
