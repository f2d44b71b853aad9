"""From an inventory target to a TVM target, and the compiler that links for it.

A target is a TVM tag (`raspberry-pi/4b-aarch64`) or a JSON dict (`{"kind": "llvm", "mtriple":
"aarch64-linux-gnu", "mattr": ["+neon"]}`). When the target's triple is not this machine's, the
library is linked with a cross compiler: the inventory's `cross_compiler`, else a default per
triple, checked with `CC -dumpmachine` before any compile starts.

`check_inventory_targets` asks TVM about every target when an inventory is loaded, so a tag deploy
would refuse is refused by every command, naming the file and the dotted key. TVM takes seconds to
import, so its verdicts are kept in the cache per TVM version and only a new target imports it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hostkit.defaults import cache_dir
from hostkit.errors import InventoryError, TargetError, first_line
from hostkit.inventory import Device, Inventory

if TYPE_CHECKING:
    import tvm

__all__ = ["ResolvedTarget", "resolve_target", "check_cross_compiler", "check_inventory_targets",
           "CROSS_TOOLCHAINS", "arch_of_triple", "complete_from_device", "for_device_cpu",
           "llvm_cpu_for", "ARM_CPU_PARTS", "wide_vectors", "registers", "vector_bits"]

log = logging.getLogger("edgekit")
# Verdicts kept in the cache: enough for every target a fleet has, bounded whatever is tried.
_MAX_VERDICTS = 512
# Importing TVM in a child takes about 2 s; a minute means something is wrong with the install.
_ASK_TIMEOUT_S = 60.0

# Triple prefix -> (default compiler, Debian package that provides it).
CROSS_TOOLCHAINS: dict[str, tuple[str, str]] = {
    "aarch64": ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
    "arm": ("arm-linux-gnueabihf-gcc", "gcc-arm-linux-gnueabihf"),
    "x86_64": ("x86_64-linux-gnu-gcc", "gcc-x86-64-linux-gnu"),
    "riscv64": ("riscv64-linux-gnu-gcc", "gcc-riscv64-linux-gnu"),
}


# Arm's MIDR "CPU part" numbers (what /proc/cpuinfo reports on arm64 boards) -> LLVM's -mcpu.
ARM_CPU_PARTS: dict[str, str] = {
    "0xd03": "cortex-a53", "0xd04": "cortex-a35", "0xd05": "cortex-a55", "0xd07": "cortex-a57",
    "0xd08": "cortex-a72", "0xd09": "cortex-a73", "0xd0a": "cortex-a75", "0xd0b": "cortex-a76",
    "0xd0c": "neoverse-n1", "0xd0d": "cortex-a77", "0xd40": "neoverse-v1", "0xd41": "cortex-a78",
    "0xd44": "cortex-x1", "0xd46": "cortex-a510", "0xd47": "cortex-a710", "0xd49": "neoverse-n2",
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

    spec = _spec(device)
    try:
        target = tvm.target.Target(spec)
    except Exception as exc:  # TVM raises ValueError or its own errors for bad targets
        raise TargetError(_explain(spec, exc), device=device.name, stage="target") from exc
    host = target.host or target
    triple = str(host.attrs["mtriple"]) if "mtriple" in host.attrs else None
    if triple and "conda" in triple:
        triple = None  # the host's own LLVM default triple, e.g. x86_64-conda-linux-gnu
    return ResolvedTarget(target=target, triple=triple, kind=str(target.kind.name))


def complete_from_device(device: Device, resolved: ResolvedTarget,
                         info: dict[str, Any]) -> ResolvedTarget:
    """A CUDA target whose inventory entry names no `arch`, completed with the compute capability
    of the device's first GPU (TVM would otherwise guess sm_50 from this machine); any other
    target as it is."""
    spec = device.target
    if resolved.kind != "cuda" or isinstance(spec, str) or spec.get("arch"):
        return resolved
    gpus = [g for g in info.get("gpus") or [] if isinstance(g, dict) and g.get("arch")]
    if not gpus:
        raise TargetError("the target names no CUDA arch and the device reports no GPU; name one "
                          "in the inventory, e.g. {kind: cuda, arch: sm_87}", device=device.name,
                          stage="target")
    completed = device.with_overrides(target={**dict(spec), "arch": str(gpus[0]["arch"])})
    return resolve_target(completed)


def for_device_cpu(resolved: ResolvedTarget, info: dict[str, Any]) -> ResolvedTarget:
    """An LLVM target that names no `mcpu`, for the device's own CPU where edgekit can name it
    (`llvm_cpu_for`, as tuning does), so an untuned build uses its vector extensions too (AVX-512,
    VNNI for int8); any other target as it is. Records stay keyed by the inventory's target."""
    import tvm

    spec = {k: v for k, v in resolved.to_json().items() if k not in ("keys", "tag")}
    if resolved.kind != "llvm" or spec.get("mcpu"):
        return resolved
    mcpu = llvm_cpu_for(info)
    if not mcpu:
        return resolved
    spec["mcpu"] = mcpu
    return ResolvedTarget(target=tvm.target.Target(spec), triple=resolved.triple,
                          kind=resolved.kind)


def _host_cpu_model() -> str:
    from devicekit.info import device_info  # the same reading the daemon reports

    return str(device_info(with_gpus=False)["cpu"])


def llvm_cpu_for(info: dict[str, Any]) -> str | None:
    """LLVM's name for the device's CPU, or None when edgekit cannot tell it reliably.

    A device with this machine's architecture and CPU model gets LLVM's detection of the host CPU
    (its vector extensions, e.g. AVX-512, are the device's too); an Arm board is named by its
    CPU part number. Anything else stays generic, which is slower but never wrong.
    """
    arch = arch_of_triple(str(info.get("arch", "")))
    cpu = str(info.get("cpu", "")).strip()
    if arch in ("aarch64", "arm"):
        return ARM_CPU_PARTS.get(cpu.lower())
    if arch == arch_of_triple(platform.machine()) and cpu and cpu == _host_cpu_model():
        from tvm.target import codegen

        name = str(codegen.llvm_get_system_cpu())
        return name if name and name != "generic" else None
    return None


def _spec(device: Device) -> Any:
    """The device's target as TVM is given it."""
    spec: Any = device.target if isinstance(device.target, str) else dict(device.target)
    if isinstance(spec, dict) and str(spec.get("mtriple", "")).endswith("gnueabihf"):
        # A hard-float triple needs the hard-float ABI, or the linker refuses to mix the objects.
        spec.setdefault("mfloat-abi", "hard")
    return spec


def _explain(spec: Any, exc: Exception) -> str:
    import difflib

    import tvm

    if isinstance(spec, str) and " -" in spec:
        return (f"target {spec!r} uses the old string form, which TVM 0.27 rejects; write it as a "
                f'dict, e.g. {{kind: llvm, mcpu: cortex-a72}}')
    if isinstance(spec, str):
        close = difflib.get_close_matches(spec, list(tvm.target.list_tags()), n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return (f"unknown target tag {spec[:80]!r}; {hint}use a TVM tag (tvm.target.list_tags()) "
                "or a dict such as {kind: llvm}")
    kinds = [str(kind) for kind in tvm.target.Target.list_kinds()]
    kind = spec.get("kind")
    if kind not in kinds:
        close = difflib.get_close_matches(str(kind), kinds, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"unknown target kind {str(kind)[:80]!r}; {hint}known kinds: {', '.join(kinds)}"
    reason = first_line(exc).split(". Target creation from")[0]
    return f"target {json.dumps(spec, default=str)[:200]} is rejected by TVM: {reason[:200]}"


def check_inventory_targets(inventory: Inventory) -> None:
    """InventoryError for the first target TVM would refuse, naming the file and the dotted key.

    Each distinct target is asked once; a target TVM has already judged (same TVM version) is
    answered from the cache without importing TVM.
    """
    specs: dict[str, tuple[Any, str]] = {}
    for device in inventory.devices.values():
        spec = _spec(device)
        dotted = inventory.target_keys.get(device.name, f"devices.{device.name}.target")
        specs.setdefault(json.dumps(spec, sort_keys=True, default=str), (spec, dotted))
    where = str(inventory.path) if inventory.path else "inventory"
    version, verdicts = _load_verdicts()
    new = [key for key in specs if key not in verdicts]
    if new:
        verdicts.update(zip(new, _ask_tvm([specs[key][0] for key in new], where)))
        _save_verdicts(version, verdicts)
    for key, (_, dotted) in specs.items():
        if verdicts[key]:
            raise InventoryError(f"{where}: {dotted}: {verdicts[key]}")


def _ask_tvm(specs: list[Any], where: str) -> list[str | None]:
    """TVM's verdict on each target, from a child Python that imports TVM without torch.

    That takes half the time and a quarter of the memory of importing TVM here (TVM's FFI imports
    torch when it can), and TVM's own warnings ("Unable to detect CUDA version") stay off the
    user's terminal.
    """
    import hostkit

    root = str(Path(hostkit.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    code = ("import sys; sys.modules['torch'] = None\n"
            "from hostkit.build.targets import _judge_targets; _judge_targets()")
    proc: subprocess.CompletedProcess[str] | None = None
    try:
        proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(specs),
                              capture_output=True, text=True, timeout=_ASK_TIMEOUT_S,
                              env={**os.environ, "PYTHONPATH": path})
        answers = json.loads(proc.stdout)
        if (not isinstance(answers, list) or len(answers) != len(specs)
                or not all(a is None or isinstance(a, str) for a in answers)):
            raise ValueError(f"unexpected answer {proc.stdout[:200]!r}")
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.debug("the target check failed: %s; its stderr: %s", exc, proc and proc.stderr)
        raise InventoryError(f"{where}: TVM could not check the targets ({first_line(exc)}); "
                             "does `python -c 'import tvm'` work?") from exc
    return answers


def _judge_targets() -> None:
    """The child's side of _ask_tvm: targets as JSON on stdin, verdicts as JSON on stdout."""
    import tvm

    verdicts: list[str | None] = []
    for spec in json.load(sys.stdin):
        try:
            tvm.target.Target(spec)
            verdicts.append(None)
        except Exception as exc:  # TVM raises ValueError or its own errors for bad targets
            verdicts.append(_explain(spec, exc))
    json.dump(verdicts, sys.stdout)


def _verdicts_path() -> Path:
    return cache_dir() / "targets.json"


def _tvm_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("apache-tvm")
    except metadata.PackageNotFoundError:
        return None  # a TVM built from source: no version to key verdicts by, so none are kept


def _load_verdicts() -> tuple[str | None, dict[str, str | None]]:
    version = _tvm_version()
    try:
        data = json.loads(_verdicts_path().read_text(encoding="utf-8"))
        kept = data["verdicts"] if version is not None and data["tvm"] == version else {}
        verdicts = {str(k): v for k, v in dict(kept).items() if v is None or isinstance(v, str)}
    except (OSError, ValueError, TypeError, KeyError):
        verdicts = {}  # no cache yet, or an unreadable one: ask TVM again
    return version, verdicts


def _save_verdicts(version: str | None, verdicts: dict[str, str | None]) -> None:
    """Replace the cache file whole (a reader never sees half of it); a failure only costs time."""
    if version is None:
        return
    path = _verdicts_path()
    kept = dict(list(verdicts.items())[-_MAX_VERDICTS:])
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".targets.", suffix=".tmp",
                                         delete=False, encoding="utf-8") as tmp:
            tmp_name = tmp.name
            json.dump({"tvm": version, "verdicts": kept}, tmp)
        os.replace(tmp_name, path)
    except OSError as exc:
        log.debug("could not keep target verdicts in %s: %s", path, exc)
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)


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


def wide_vectors(target: "tvm.target.Target") -> "tvm.target.Target":
    """`target` with LLVM told to use the full 512-bit vectors of an AVX-512 CPU.

    On such CPUs LLVM by default keeps vectorized loops at 256 bits (a hedge against the clock
    drop early AVX-512 server parts showed), so a 16-lane loop is split in two halves. The
    kernels here are scheduled for the full width; measured side by side (untuned, in-process):
    MobileNetV2 int8 5.0 -> 3.7 ms (its requantizations and depthwise convolutions are integer
    and float vector work), fp32 9.7 -> 9.6 ms, ResNet-18 unchanged. A target that says either
    way (`prefer-256-bit` in its `mattr`) is left as it is."""
    import tvm
    from tvm.target import codegen

    try:
        avx512 = bool(codegen.target_has_features("avx512f", target))
    except Exception:  # an Arm or unknown triple: LLVM has no such feature to ask about
        return target
    config = dict(target.export())
    mattr = [str(m) for m in config.get("mattr", [])]
    if not avx512 or any("prefer-256-bit" in m for m in mattr):
        return target
    config["mattr"] = [*mattr, "-prefer-256-bit"]
    return tvm.target.Target(config)


def registers(target: "tvm.target.Target") -> int:
    """Vector registers the target's CPU has: 32 with AVX-512 or on AArch64, else 16."""
    from tvm.target import codegen

    if "aarch64" in str(target.attrs.get("mtriple", "")):
        return 32
    try:
        return 32 if codegen.target_has_features("avx512f", target) else 16
    except Exception:  # an unknown triple: assume the smaller register file
        return 16


def vector_bits(target: "tvm.target.Target") -> int:
    """The width of the target CPU's vectors in bits (128 where LLVM cannot say)."""
    from tvm.target import codegen

    try:
        bits = int(codegen.llvm_get_vector_width(target))
    except Exception:
        bits = 0
    return bits if bits > 0 else 128
