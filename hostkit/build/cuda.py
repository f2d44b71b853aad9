"""CUDA kernels compiled on the host, for the device's GPU, so nothing is compiled on the board.

TVM 0.27's CUDA codegen hands its CUDA C++ source to `ffi.Module.create.cuda`, which exists only
where `libtvm_runtime_cuda.so` loaded (a machine with an NVIDIA driver); it compiles the source
there with NVRTC for whatever GPU that machine has. Elsewhere it keeps the source, and the device
compiles it when it loads the library, which needs TVM's compiler (`tvm_callback_cuda_compile`,
Python, 250 MB of `libtvm_compiler.so`) on the board.

edgekit always takes the second path (`TVM_COMPILE_FORCE_FALLBACK` while it compiles a CUDA
target), then packs the library's imported modules itself: each CUDA module's source is compiled
with NVRTC for the target's `arch` and stored as a cubin (or as PTX, which the driver of any newer
GPU can compile, when the device asks for `cuda_kernels: ptx`). The library then holds binary
kernels and no source, and loads on TVM's runtime alone.

The packed blob is TVM-FFI's library format: `<nbytes u64> <indptr vec<u64>> <children
vec<u64>>`, then per module `<kind str> [<bytes str>]`; a CUDA module's bytes are `<fmt str>
<function map> <code str>`, its code last.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from hostkit.errors import CompileError, first_line

__all__ = ["KERNEL_FORMATS", "cuda_arch", "kernels_from_source", "pack_imports_compiled",
           "cuda_toolkit", "library_kernels", "cubin_arch"]

KERNEL_FORMATS = ("cubin", "ptx")
_ARCH = re.compile(r"^sm_(\d{2,3})[af]?$")
_FORCE = "TVM_COMPILE_FORCE_FALLBACK"
_force_lock = threading.Lock()
# How many builds are keeping CUDA kernels as source now, and the variable's value before them.
_force: dict[str, Any] = {"users": 0, "saved": None}


def cuda_arch(target: Any) -> str:
    """The `sm_XX` a CUDA target is compiled for; a CompileError when it names none."""
    arch = str(target.attrs["arch"]) if "arch" in target.attrs else ""
    if not _ARCH.match(arch):
        raise CompileError(f"CUDA target names no GPU architecture ({arch or 'no arch'}); give "
                           "it one, e.g. {kind: cuda, arch: sm_87}, or let edgekit read it from "
                           "the device", stage="compile")
    return arch


@contextlib.contextmanager
def kernels_from_source() -> Iterator[None]:
    """While a CUDA target compiles: keep its kernels as source, whatever GPU this machine has,
    so they are compiled once, by `pack_imports_compiled`, for the device's arch. Counted, since
    builds for several devices run in threads and TVM reads the variable at each codegen."""
    with _force_lock:
        if _force["users"] == 0:
            _force["saved"] = os.environ.get(_FORCE)
            os.environ[_FORCE] = "1"
        _force["users"] += 1
    try:
        yield
    finally:
        with _force_lock:
            _force["users"] -= 1
            if _force["users"] == 0:
                if _force["saved"] is None:
                    os.environ.pop(_FORCE, None)
                else:
                    os.environ[_FORCE] = _force["saved"]


def cuda_toolkit() -> Path | None:
    """The CUDA toolkit whose headers NVRTC compiles TVM's kernels with (it needs cuda_runtime.h
    and libcu++): $CUDA_PATH, the folder above a real `nvcc`, or /usr/local/cuda."""
    import shutil

    candidates = [os.environ.get("CUDA_PATH", "")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
        # A wrapper script (`exec /usr/local/cuda-13.0/bin/nvcc "$@"`) names the real one.
        with contextlib.suppress(OSError, UnicodeDecodeError):
            text = Path(nvcc).read_text(encoding="utf-8")[:4096]
            candidates += [str(Path(m).parent.parent) for m in re.findall(r"(/\S+/bin/nvcc)", text)]
    candidates.append("/usr/local/cuda")
    for folder in candidates:
        if folder and _has_headers(Path(folder)):
            return Path(folder)
    return None


def _has_headers(folder: Path) -> bool:
    if not (folder / "include" / "cuda_runtime.h").is_file():
        return False
    return any((folder / "include").glob("cuda/std/cstdint")) or any(
        folder.glob("targets/*/include/cccl/cuda/std/cstdint"))


def compile_kernels(source: str, arch: str, fmt: str) -> bytes:
    """One CUDA module's source compiled with NVRTC: a cubin for `arch`, or its PTX."""
    toolkit = cuda_toolkit()
    if toolkit is None:
        raise CompileError("compiling CUDA kernels needs the CUDA toolkit's headers "
                           "(cuda_runtime.h and libcu++) on this machine; install the CUDA "
                           "toolkit or set CUDA_PATH", stage="compile")
    # TVM's NVRTC wrapper finds the headers through CUDA_PATH; the same value for every build.
    os.environ.setdefault("CUDA_PATH", str(toolkit))
    from tvm.support import nvcc

    try:
        binary = nvcc.compile_cuda(source, target_format=fmt, arch=arch, compiler="nvrtc")
    except Exception as exc:  # NVRTC's log, a missing cuda-bindings, an unknown arch
        raise CompileError(f"NVRTC could not compile the CUDA kernels for {arch}: "
                           f"{first_line(exc)}", stage="compile") from exc
    return bytes(binary)


def pack_imports_compiled(arch: str, fmt: str) -> Callable[..., str]:
    """An `fpack_imports` for `export_library`: the imported modules packed as TVM packs them,
    with each CUDA module's source replaced by its compiled kernels."""
    if fmt not in KERNEL_FORMATS:
        raise CompileError(f"unknown CUDA kernel format {fmt!r}; one of "
                           f"{', '.join(KERNEL_FORMATS)}", stage="compile")

    def pack(mod: Any, is_system_lib: bool, prefix: str, workspace_dir: str) -> str:
        import tvm

        blob = bytes(tvm.get_global_func("runtime.ModulePackImportsToTensor")(mod).numpy()
                     .tobytes())
        sources = [m.inspect_source("cuda") for m in
                   mod._collect_from_import_tree(lambda m: m.kind == "cuda")]
        blob = replace_cuda_code(blob, [s.encode() for s in sources],
                                 lambda src: compile_kernels(src.decode(), arch, fmt), fmt)
        llvm = [m for m in mod._collect_dso_modules() if m.kind == "llvm"]
        if not llvm:
            raise CompileError("a CUDA library needs an llvm host module to carry its kernels",
                               stage="export")
        triple = llvm[0].get_function("_get_target_string")()
        path = os.path.join(workspace_dir, f"{prefix}devc.o")
        tvm.get_global_func("codegen.codegen_blob")(blob, is_system_lib, triple, prefix) \
            .write_to_file(path)
        return path

    return pack


def _read_str(blob: bytes, at: int) -> tuple[bytes, int]:
    (size,) = struct.unpack_from("<Q", blob, at)
    end = at + 8 + size
    if end > len(blob):
        raise ValueError(f"a field at {at} runs past the end")
    return blob[at + 8:end], end


def _read_vec(blob: bytes, at: int) -> tuple[list[int], int]:
    (count,) = struct.unpack_from("<Q", blob, at)
    values = list(struct.unpack_from(f"<{count}Q", blob, at + 8))
    return values, at + 8 + 8 * count


def _str(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def replace_cuda_code(blob: bytes, sources: list[bytes], compile_one: Callable[[bytes], bytes],
                      fmt: str) -> bytes:
    """The packed library blob with every CUDA module that holds source holding `fmt` instead.

    A CUDA module holding anything but the source edgekit saw (already compiled, or a layout this
    TVM does not write) is refused, never shipped half-compiled.
    """
    try:
        (nbytes,) = struct.unpack_from("<Q", blob, 0)
        if nbytes != len(blob) - 8:
            raise ValueError(f"header says {nbytes} bytes, the blob has {len(blob) - 8}")
        indptr, at = _read_vec(blob, 8)
        _, at = _read_vec(blob, at)
        head, parts = blob[8:at], []
        for _ in range(len(indptr) - 1):
            kind, at = _read_str(blob, at)
            parts.append(_str(kind))
            if kind == b"_lib":
                continue
            data, at = _read_str(blob, at)
            if kind == b"cuda":
                data = _compiled_module(data, sources, compile_one, fmt)
            parts.append(_str(data))
        if at != len(blob):
            raise ValueError(f"{len(blob) - at} bytes left after the last module")
    except (struct.error, ValueError) as exc:
        raise CompileError(f"cannot read the library's packed modules: {exc}",
                           stage="export") from exc
    body = head + b"".join(parts)
    return struct.pack("<Q", len(body)) + body


def _compiled_module(data: bytes, sources: list[bytes], compile_one: Callable[[bytes], bytes],
                     fmt: str) -> bytes:
    kernel_fmt, rest = _read_str(data, 0)
    if kernel_fmt != b"cuda":
        raise ValueError(f"a CUDA module already holds {kernel_fmt.decode(errors='replace')!r} "
                         "kernels, not source (was the target compiled outside edgekit?)")
    source = next((s for s in sources if data.endswith(_str(s))), None)
    if source is None:
        raise ValueError("a CUDA module's source is not where TVM 0.27 puts it")
    function_map = data[rest:len(data) - len(_str(source))]
    return _str(fmt.encode()) + function_map + _str(compile_one(source))


def library_kernels(path: Path) -> list[tuple[str, bytes]]:
    """What each CUDA module of a linked library holds, as (format, code): "cubin" with an ELF
    for the GPU, "ptx" text, or "cuda" source (compiled on the device at load)."""
    data = path.read_bytes()
    at = _elf_symbol_offset(data, b"__tvm_ffi__library_bin")
    if at is None:
        return []
    (nbytes,) = struct.unpack_from("<Q", data, at)
    blob = data[at:at + 8 + nbytes]
    indptr, pos = _read_vec(blob, 8)
    _, pos = _read_vec(blob, pos)
    found = []
    for _ in range(len(indptr) - 1):
        kind, pos = _read_str(blob, pos)
        if kind == b"_lib":
            continue
        module, pos = _read_str(blob, pos)
        if kind == b"cuda":
            fmt, _ = _read_str(module, 0)
            (size,) = struct.unpack_from("<Q", module, len(module) - 8 - _tail_size(module))
            found.append((fmt.decode(), module[len(module) - size:]))
    return found


def _tail_size(module: bytes) -> int:
    """The length of a CUDA module's last field (its code): the one length that, read 8 bytes
    before that many last bytes, names exactly them."""
    for size in range(len(module) - 16, -1, -1):
        if struct.unpack_from("<Q", module, len(module) - 8 - size)[0] == size:
            return size
    raise ValueError("a CUDA module without code")


def cubin_arch(cubin: bytes) -> str | None:
    """The `sm_XX` a cubin runs on, from its ELF header (e_machine 190, EM_CUDA), or None."""
    if cubin[:4] != b"\x7fELF" or struct.unpack_from("<H", cubin, 18)[0] != 190:
        return None
    (flags,) = struct.unpack_from("<I", cubin, 48)
    return f"sm_{(flags >> 8) & 0xff}"


def _elf_symbol_offset(data: bytes, name: bytes) -> int | None:
    """The file offset of a symbol's data in a 64-bit little-endian ELF, or None."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
                for i in range(shnum)]
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind not in (2, 11) or not entsize:  # SHT_SYMTAB, SHT_DYNSYM
            continue
        strtab = sections[link][4]
        for at in range(offset, offset + size, entsize):
            st_name, _, _, shndx, value, _ = struct.unpack_from("<IBBHQQ", data, at)
            end = data.index(b"\0", strtab + st_name)
            if data[strtab + st_name:end] == name and 0 < shndx < len(sections):
                section = sections[shndx]
                return value - section[3] + section[4]
    return None
