"""A second, bare arm64 root filesystem: a bundle plus the C libraries it links, nothing else.

Built from the emulated board's image: the dynamic loader and each library the bundle's ELF files
need (followed through their own needs), so running the runner in a chroot of it proves that no
Python, no TVM install and no shell is involved. qemu runs it through binfmt_misc's F flag, which
holds the interpreter open, so the chroot needs no qemu either.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

__all__ = ["make_bare_rootfs", "run_in_bare_rootfs"]

LIBDIR = "lib/aarch64-linux-gnu"
LOADER = "lib/ld-linux-aarch64.so.1"


def _needed(path: Path) -> list[str]:
    dynamic = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True,
                             check=True).stdout
    return [line.split("[", 1)[1].rstrip("]") for line in dynamic.splitlines()
            if "(NEEDED)" in line]


def make_bare_rootfs(board_rootfs: Path, bundle: Path, dest: Path) -> list[str]:
    """dest/bundle (a copy of bundle), dest/lib (what it links); returns the libraries copied."""
    (dest / LIBDIR).mkdir(parents=True)
    (dest / "proc").mkdir()
    (dest / "out").mkdir()
    shutil.copytree(bundle, dest / "bundle")
    search = [board_rootfs / "usr" / LIBDIR, board_rootfs / LIBDIR]
    todo = [p for p in bundle.iterdir() if p.name == "edgekit-runner" or p.suffix == ".so"]
    copied: list[str] = []
    while todo:
        for name in _needed(todo.pop()):
            if name in copied or (bundle / name).exists():
                continue
            source = next((d / name for d in search if (d / name).exists()), None)
            assert source is not None, f"{name} is not in the board image"
            shutil.copyfile(source.resolve(), dest / LIBDIR / name)
            os.chmod(dest / LIBDIR / name, 0o755)
            copied.append(name)
            todo.append(source.resolve())
    shutil.copyfile((board_rootfs / LOADER).resolve(), dest / LOADER)
    os.chmod(dest / LOADER, 0o755)
    return sorted(copied)


def run_in_bare_rootfs(root: Path, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """argv in a chroot of root (with /proc), in a private mount namespace, environment empty."""
    chroot = shutil.which("chroot", path="/usr/sbin:/usr/bin:/sbin:/bin")
    script = f"mount -t proc proc {root}/proc && exec env -i {chroot} {root} " + " ".join(argv)
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                           script], env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                          capture_output=True, text=True, timeout=600, check=False)
