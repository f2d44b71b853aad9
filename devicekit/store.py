"""The device's artifact store: compiled models kept across RPC sessions, keyed by their sha256.

TVM's RPC server gives every session a fresh temporary folder and deletes it when the session ends.
The store lets the host skip re-sending a model (with its weights) that the device already holds.
An upload is verified against the hash the host announced, then renamed into place, so a broken
or partial transfer never sits where the loader would find it.
"""

from __future__ import annotations

import hashlib
import os
import platform
import time
from pathlib import Path
from typing import Callable

from devicekit.info import elf_machine

__all__ = ["ArtifactStore", "StoreError", "default_store_dir"]

FORMATS = (".so", ".tar")
# Links a `.tar` of object files into a shared library: (tar, output).
LinkFn = Callable[[Path, Path], None]


class StoreError(RuntimeError):
    """An artifact that cannot be stored or loaded; the message is shown to the host's user."""


def default_store_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edgekit-device" / "artifacts"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ArtifactStore:
    """A folder of `<sha256><ext>` files, with the newest `keep` artifacts kept."""

    def __init__(self, root: Path, keep: int = 16, formats: tuple[str, ...] = FORMATS) -> None:
        self.root = Path(root)
        self.keep = keep
        self.formats = formats  # baseline models (.pt2, .onnx) are kept in a store of their own
        self.root.mkdir(parents=True, exist_ok=True)

    def find(self, sha256: str) -> Path | None:
        for ext in self.formats:
            path = self.root / f"{sha256}{ext}"
            if path.exists():
                return path
        return None

    def commit(self, uploaded: Path, sha256: str) -> Path:
        """Move an uploaded file into the store once its hash matches the announced one."""
        ext = uploaded.suffix
        if ext not in self.formats:
            raise StoreError(f"artifact {uploaded.name}: unknown format, expected one of "
                             f"{self.formats}")
        actual = file_sha256(uploaded)
        if actual != sha256:
            uploaded.unlink(missing_ok=True)
            raise StoreError(
                f"artifact {sha256[:12]}: upload corrupted (received sha256 {actual[:12]}); "
                "it was discarded, deploy again to resend it"
            )
        final = self.root / f"{sha256}{ext}"
        os.replace(uploaded, final) if _same_fs(uploaded, self.root) else _copy_into(uploaded, final)
        self._evict()
        return final

    def library_path(self, sha256: str, link: LinkFn) -> Path:
        """The loadable shared library of an artifact, linking a `.tar` here the first time."""
        path = self.find(sha256)
        if path is None:
            raise StoreError(f"artifact {sha256[:12]} is not on this device; deploy it again")
        os.utime(path)
        if path.suffix == ".tar":
            linked = path.with_suffix(".linked.so")
            if not linked.exists():
                tmp = linked.with_suffix(f".{os.getpid()}.tmp.so")
                link(path, tmp)
                os.replace(tmp, linked)
            path = linked
        else:
            self.check_arch(path)
        return path

    @staticmethod
    def check_arch(path: Path) -> None:
        with open(path, "rb") as handle:
            built_for = elf_machine(handle.read(64))
        here = platform.machine()
        if built_for is None:
            raise StoreError(f"artifact {path.name} is not an ELF shared library")
        if not _arch_compatible(built_for, here):
            raise StoreError(
                f"artifact {path.name} is built for {built_for} but this device is {here}; "
                "check the device's target in the inventory"
            )

    def _evict(self) -> None:
        files = sorted(self.root.glob("*"), key=lambda p: p.stat().st_mtime, reverse=True)
        artifacts = [p for p in files if ".tmp" not in p.name and p.suffix in self.formats]
        for stale in artifacts[self.keep :]:
            stale.unlink(missing_ok=True)
            stale.with_suffix(".linked.so").unlink(missing_ok=True)


def _arch_compatible(built_for: str, here: str) -> bool:
    if built_for == here:
        return True
    arm32 = {"armv7l", "armv8l", "armv6l", "arm"}
    return built_for in arm32 and here in arm32


def _same_fs(src: Path, folder: Path) -> bool:
    return os.stat(src).st_dev == os.stat(folder).st_dev


def _copy_into(src: Path, final: Path) -> None:
    tmp = final.with_name(f"{final.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    with open(src, "rb") as reader, open(tmp, "wb") as writer:
        for block in iter(lambda: reader.read(1 << 20), b""):
            writer.write(block)
    os.replace(tmp, final)
    src.unlink(missing_ok=True)
