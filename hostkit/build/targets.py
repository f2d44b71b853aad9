"""From an inventory target to a TVM target, and the compiler that links for it.

A target is a TVM tag (`raspberry-pi/4b-aarch64`) or a JSON dict (`{"kind": "llvm", "mtriple":
"aarch64-linux-gnu", "mattr": ["+neon"]}`). When the target's triple is not this machine's, the
library is linked with a cross compiler: the inventory's `cross_compiler`, else a default per
triple, checked with `CC -dumpmachine` before any compile starts.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hostkit.errors import TargetError
from hostkit.inventory import Device

if TYPE_CHECKING:
    import tvm

__all__ = ["ResolvedTarget", "resolve_target", "check_cross_compiler", "CROSS_TOOLCHAINS",
           "arch_of_triple"]

# Triple prefix -> (default compiler, Debian package that provides it).
CROSS_TOOLCHAINS: dict[str, tuple[str, str]] = {
    "aarch64": ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
    "arm": ("arm-linux-gnueabihf-gcc", "gcc-arm-linux-gnueabihf"),
    "x86_64": ("x86_64-linux-gnu-gcc", "gcc-x86-64-linux-gnu"),
    "riscv64": ("riscv64-linux-gnu-gcc", "gcc-riscv64-linux-gnu"),
}


def arch_of_triple(triple: str) -> str:
    """The architecture family of a target triple: aarch64, arm, x86_64, riscv64, ..."""
    arch = triple.split("-", 1)[0]
    if arch.startswith(("armv", "thumb")) or arch == "arm":
        return "arm"
    if arch in ("arm64",):
        return "aarch64"
    if arch in ("amd64",):
        return "x86_64"
    return arch


def _host_arch() -> str:
    return arch_of_triple(platform.machine())


@dataclass(frozen=True)
class ResolvedTarget:
    target: "tvm.target.Target"
    triple: str | None
    kind: str

    @property
    def arch(self) -> str:
        return arch_of_triple(self.triple) if self.triple else _host_arch()

    @property
    def is_cross(self) -> bool:
        return self.arch != _host_arch()

    def to_json(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(json.dumps(dict(self.target.export()), default=str))
        return result

    def describe(self) -> str:
        attrs = self.target.attrs
        parts = [self.kind]
        for key in ("mtriple", "mcpu", "arch"):
            if key in attrs and attrs[key] and "conda" not in str(attrs[key]):
                parts.append(str(attrs[key]))
        return " ".join(parts)


def resolve_target(device: Device) -> ResolvedTarget:
    """The device's TVM target; an unknown tag or a rejected dict is one line naming the device."""
    import tvm

    spec: Any = device.target if isinstance(device.target, str) else dict(device.target)
    if isinstance(spec, dict) and str(spec.get("mtriple", "")).endswith("gnueabihf"):
        # A hard-float triple needs the hard-float ABI, or the linker refuses to mix the objects.
        spec.setdefault("mfloat-abi", "hard")
    try:
        target = tvm.target.Target(spec)
    except Exception as exc:  # TVM raises ValueError or its own errors for bad targets
        raise TargetError(_explain(spec, exc), device=device.name, stage="target") from exc
    host = target.host or target
    triple = str(host.attrs["mtriple"]) if "mtriple" in host.attrs else None
    if triple and "conda" in triple:
        triple = None  # the host's own LLVM default triple, e.g. x86_64-conda-linux-gnu
    return ResolvedTarget(target=target, triple=triple, kind=str(target.kind.name))


def _explain(spec: Any, exc: Exception) -> str:
    text = str(exc)
    if isinstance(spec, str) and " -" in spec:
        return (f"target '{spec}' uses the old string form, which TVM 0.27 rejects; write it as a "
                f'dict, e.g. {{kind: llvm, mcpu: cortex-a72}}')
    if isinstance(spec, str):
        import difflib

        import tvm

        tags = list(tvm.target.list_tags())
        close = difflib.get_close_matches(spec, tags, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"unknown target '{spec}': {hint}use a TVM tag (tvm.target.list_tags()) or a dict"
    first = next((ln for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    return f"target {json.dumps(spec)} is rejected by TVM: {first.strip()[:200]}"


def check_cross_compiler(device: Device, resolved: ResolvedTarget,
                         tar_fallback: bool = True) -> str | None:
    """The compiler to link the device's `.so` with, or None to use this machine's default.

    A missing compiler or one that builds for another triple is a TargetError naming the Debian
    package to install, raised before minutes of compiling are spent. `tar_fallback` says whether
    `--format tar` is a way out (not for an export, whose runner loads a linked library).
    """
    if device.format == "tar":
        return None
    if not resolved.is_cross and not device.cross_compiler:
        return None
    arch = resolved.arch
    default, package = CROSS_TOOLCHAINS.get(arch, (None, None))
    compiler = device.cross_compiler or default
    if compiler is None:
        raise TargetError(f"no cross compiler known for triple {resolved.triple}; set "
                          "cross_compiler in the inventory", device=device.name, stage="toolchain")
    install = f"install it with `apt-get install {package}`" if package else "install it"
    if shutil.which(compiler) is None:
        tar = ", or use --format tar to let the board link" if tar_fallback else ""
        raise TargetError(f"cross compiler {compiler} for {resolved.triple} not found; {install}"
                          f"{tar}", device=device.name, stage="toolchain")
    try:
        machine = subprocess.run([compiler, "-dumpmachine"], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        raise TargetError(f"{compiler} -dumpmachine failed: {exc}", device=device.name,
                          stage="toolchain") from exc
    if arch_of_triple(machine) != arch:
        raise TargetError(f"{compiler} builds for {machine}, but the target is {resolved.triple}; "
                          f"set cross_compiler for this device ({install})", device=device.name,
                          stage="toolchain")
    return compiler
