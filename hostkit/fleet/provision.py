"""`edgekit device install`: devicekit and the host's exact TVM on a board, installed offline there.

The board needs only SSH and a Python 3.10+. The host downloads the wheels for the board's
platform (cached under `cache_dir()/wheels/<platform>`), builds a wheel of this edgekit, and
pushes them by SFTP; the board then makes `<work_dir>/venv` and installs from those files with
`--no-index`, so it never reaches a package index. Running it again pushes nothing new and leaves
a working install as it is. `--baselines` adds the baseline engines (`hostkit.engines`) the same
way, so the board can run the model in PyTorch and ONNX Runtime beside TVM.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

from hostkit.defaults import cache_dir
from hostkit.engines import WheelSet, board_wheels
from hostkit.errors import ConnectError, RemoteError, TransferError
from hostkit.inventory import Device
from hostkit.transport.ssh import RemotePython, check_devicekit, host_tvm_version, probe_python
from hostkit.transport.sshconn import SshConnection

__all__ = ["InstallResult", "install_device", "board_platform", "requirements"]

Step = Callable[[str], None]

# Architectures apache-tvm publishes manylinux wheels for, as `uname -m` names them.
WHEEL_ARCHES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
GLIBC_MIN = (2, 28)
PYTHON_MIN = (3, 10)
TVM_FFI_FALLBACK = "0.1.14.post1"  # pinned in pyproject.toml; see the comment there
INSTALL_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class InstallResult:
    """What `install_device` left on the board."""

    device: str
    python: str
    python_version: str
    arch: str
    platform: str
    tvm_version: str
    sent: tuple[str, ...]  # the wheels this run pushed (none when the board had them all)
    bytes_sent: int
    installed: bool  # False when the board already had this exact install
    seconds: float
    baselines: tuple[str, ...] = ()  # baseline engines installed beside TVM
    runtime_only: bool = False
    # The venv's size on the board with TVM's compiler and without it (runtime-only installs).
    venv_bytes_full: int | None = None
    venv_bytes: int | None = None

    def __str__(self) -> str:
        sent = (f"{len(self.sent)} wheels sent ({self.bytes_sent / 1e6:.1f} MB)"
                if self.sent else "nothing new to send")
        state = "installed" if self.installed else "already up to date"
        engines = f", baselines {', '.join(self.baselines)}" if self.baselines else ""
        size = ""
        if self.venv_bytes is not None and self.venv_bytes_full is not None:
            size = (f", runtime only: {self.venv_bytes_full / 1e6:.0f} MB -> "
                    f"{self.venv_bytes / 1e6:.0f} MB on the board")
        return (f"{self.python} (Python {self.python_version}, {self.arch}, TVM "
                f"{self.tvm_version}{engines}): {state}, {sent}, {self.seconds:.0f}s{size}")


def requirements() -> list[str]:
    """What the board's venv needs, pinned to this host's TVM."""
    try:
        ffi = metadata.version("apache-tvm-ffi")
    except metadata.PackageNotFoundError:
        ffi = TVM_FFI_FALLBACK
    return [f"apache-tvm=={host_tvm_version()}", f"apache-tvm-ffi=={ffi}", "numpy", "cloudpickle",
            "psutil", "pip"]


def board_platform(device: Device, remote: RemotePython) -> str:
    """The wheel platform tag for the board, or RemoteError if TVM publishes no wheels for it."""
    arch = WHEEL_ARCHES.get(remote.arch)
    if arch is None:
        raise RemoteError(f"the board is {remote.arch}; apache-tvm publishes wheels for "
                          f"{', '.join(sorted(set(WHEEL_ARCHES.values())))} only",
                          device=device.name, stage="install",
                          hint="build TVM's runtime on the board from source, then set ssh.python")
    libc, _, version = remote.libc.partition(" ")
    numbers = tuple(int(n) for n in version.split(".")[:2] if n.isdigit())
    if libc != "glibc" or numbers < GLIBC_MIN:
        raise RemoteError(f"the board's C library is {remote.libc or 'not glibc'}; TVM's wheels "
                          f"need glibc {'.'.join(map(str, GLIBC_MIN))} or newer",
                          device=device.name, stage="install",
                          hint="use a newer OS image (Debian 10 or later)")
    return f"manylinux_2_28_{arch}"


def install_device(device: Device, progress: Step | None = None,
                   baselines: tuple[str, ...] = (), runtime_only: bool = False) -> InstallResult:
    """Install devicekit and the host's TVM (and `baselines`' engines) into `<work_dir>/venv` on
    an ssh device.

    `runtime_only` then removes TVM's compiler from the board (`edgekit-device strip-compiler`):
    the daemon needs only the runtime, since every kernel is compiled on the host. Installing
    again without it puts the compiler back.
    """
    if device.transport != "ssh":
        raise ConnectError(f"`edgekit device install` works over SSH; {device.name} uses "
                           f"transport '{device.transport}'", device=device.name, stage="install",
                           hint="add transport: ssh and an ssh: section to the device")
    note = progress or (lambda _: None)
    start = time.perf_counter()
    note(f"connecting to {device.address}")
    with SshConnection(device) as conn:
        base = probe_python(conn, device.ssh.python)
        if not base.executable:
            raise RemoteError(f"python {device.ssh.python} on the board: {base.error}",
                              device=device.name, stage="install",
                              hint="install python3 there, or set ssh.python")
        if tuple(int(n) for n in base.python.split(".")[:2]) < PYTHON_MIN:
            raise RemoteError(f"the board's Python is {base.python}; edgekit needs "
                              f"{'.'.join(map(str, PYTHON_MIN))} or newer", device=device.name,
                              stage="install", hint="set ssh.python to a newer python")
        platform = board_platform(device, base)
        py_version = ".".join(base.python.split(".")[:2])
        with tempfile.TemporaryDirectory(prefix="edgekit-wheels-") as tmp:
            stage = Path(tmp)
            note(f"fetching wheels for {platform}, Python {py_version}")
            extras = board_wheels(baselines)
            wheels = _fetch_wheels(device, platform, py_version, stage, extras)
            note("building the edgekit wheel")
            wheels.append(_edgekit_wheel(device, stage / "edgekit"))
            remote_dir = f"{conn.work_dir}/wheels"
            sent, sent_bytes = _push(conn, base.path, wheels, remote_dir, note)
        venv_python = f"{conn.work_dir}/venv/bin/python"
        current = probe_python(conn, venv_python)
        host_tvm = host_tvm_version()
        fresh = (not sent and current.devicekit is not None and current.tvm == host_tvm
                 and _has_engines(conn, venv_python, baselines))
        stripped = (current.devicekit is not None and current.tvm == host_tvm
                    and _lacks_compiler(conn, venv_python))
        if not fresh or (stripped and not runtime_only):
            _install(conn, device, base.path, venv_python, [w.name for w in wheels], remote_dir,
                     note, extras, reinstall_tvm=stripped)
            current = probe_python(conn, venv_python)
            fresh = False
        check_devicekit(device, current, host_tvm)
        sizes: dict[str, int] = {}
        if runtime_only:
            note("removing TVM's compiler from the board (runtime only)")
            report = _strip(conn, venv_python)
            sizes = {"venv_bytes_full": int(report["full_bytes"]),
                     "venv_bytes": int(report["after_bytes"])}
            fresh = fresh and not report["compiler"]
    return InstallResult(device=device.name, python=venv_python, python_version=base.python,
                         arch=base.arch, platform=platform, tvm_version=host_tvm,
                         sent=sent, bytes_sent=sent_bytes, installed=not fresh,
                         seconds=time.perf_counter() - start, baselines=baselines,
                         runtime_only=runtime_only, **sizes)


def _lacks_compiler(conn: SshConnection, venv_python: str) -> bool:
    """Whether the board's TVM was made runtime-only (False when its devicekit cannot tell)."""
    probe = conn.run(f"{shlex.quote(venv_python)} -m devicekit strip-compiler --dry-run",
                     timeout=600)
    try:
        return probe.code == 0 and not json.loads(probe.stdout)["compiler"]
    except (ValueError, KeyError, TypeError):
        return False


def _strip(conn: SshConnection, venv_python: str) -> dict[str, Any]:
    """`edgekit-device strip-compiler` on the board: what it removed, the venv's size."""
    out = conn.check(f"{shlex.quote(venv_python)} -m devicekit strip-compiler",
                     stage="install", timeout=600).stdout
    try:
        report: dict[str, Any] = json.loads(out)
    except ValueError as exc:
        raise RemoteError(f"strip-compiler on the board answered {out[:80]!r}, not JSON",
                          device=conn.device.name, stage="install") from exc
    return report


def _fetch_wheels(device: Device, platform: str, py_version: str, stage: Path,
                  extras: Sequence[WheelSet] = ()) -> list[Path]:
    """Exactly the wheels the board needs, copied into `stage`; downloads only what is missing."""
    cache = cache_dir() / "wheels" / platform
    cache.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--platform", platform,
           "--python-version", py_version, "--implementation", "cp", "--quiet",
           "--disable-pip-version-check"]
    for wanted in [WheelSet(tuple(requirements())), *extras]:
        online = [*pip, *wanted.download_args()]
        offline = [*pip, "--no-index", "--find-links", str(cache), "--dest", str(stage),
                   *wanted.install_args()]
        if _pip(offline).returncode != 0:
            fetched = _pip([*online, "--dest", str(cache)])
            if fetched.returncode != 0 or _pip(offline).returncode != 0:
                tail = " | ".join(fetched.stderr.strip().splitlines()[-2:])
                where = wanted.index_url or "PyPI"
                raise TransferError(f"cannot download the board's wheels for {platform}, Python "
                                    f"{py_version} ({', '.join(wanted.requirements)}): {tail}",
                                    device=device.name, stage="install",
                                    hint=f"is {where} reachable from this host?")
    return sorted(stage.glob("*.whl"))


def _has_engines(conn: SshConnection, venv_python: str, engines: tuple[str, ...]) -> bool:
    """Whether the board's venv imports every engine (their names are their modules')."""
    if not engines:
        return True
    imports = "; ".join(f"import {engine}" for engine in engines)
    return conn.run(f"{shlex.quote(venv_python)} -c {shlex.quote(imports)}").code == 0


def _pip(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)


def _source_tree() -> Path | None:
    root = Path(__file__).resolve().parents[2]  # hostkit/fleet/provision.py -> the checkout
    return root if (root / "pyproject.toml").is_file() and (root / "devicekit").is_dir() else None


def _edgekit_wheel(device: Device, out: Path) -> Path:
    """A wheel of this edgekit, built from a copy so the checkout gets no build/ folder.

    SOURCE_DATE_EPOCH makes the wheel byte-identical for identical sources, so an unchanged
    edgekit is not pushed or reinstalled again.
    """
    root = _source_tree()
    if root is None:
        raise TransferError("this edgekit is not installed from a source tree, so no wheel can be "
                            "built for the board", device=device.name, stage="install",
                            hint="run it from an edgekit checkout (`pip install -e .`)")
    with tempfile.TemporaryDirectory(prefix="edgekit-src-") as tmp:
        src = Path(tmp)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for package in ("hostkit", "devicekit"):
            shutil.copytree(root / package, src / package, ignore=ignore)
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (root / name).is_file():
                shutil.copy2(root / name, src / name)
        # With setuptools here the build needs no index; without, pip fetches it in isolation.
        isolation = ["--no-build-isolation"] if _has_build_backend() else []
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
                   "--disable-pip-version-check", *isolation, "--wheel-dir", str(out), str(src)]
        built = subprocess.run(command, capture_output=True, text=True, timeout=600,
                               env={**os.environ, "SOURCE_DATE_EPOCH": "315532800"})
    wheels = sorted(out.glob("edgekit-*.whl"))
    if built.returncode != 0 or not wheels:
        tail = " | ".join(built.stderr.strip().splitlines()[-2:])
        raise TransferError(f"building the edgekit wheel failed: {tail}", device=device.name,
                            stage="install")
    return wheels[-1]


def _has_build_backend() -> bool:
    try:
        import setuptools  # noqa: F401
        import wheel  # noqa: F401
    except ImportError:
        return False
    return True


def _push(conn: SshConnection, python: str, wheels: list[Path], remote_dir: str,
          note: Step) -> tuple[tuple[str, ...], int]:
    """SFTP the wheels the board lacks; each lands under a part name, renamed when complete."""
    conn.check(f"mkdir -p {shlex.quote(remote_dir)}", stage="install")
    sftp = conn.sftp()
    present = {entry.filename: entry.st_size for entry in sftp.listdir_attr(remote_dir)}
    missing = [w for w in wheels if not _same_on_board(conn, python, w, remote_dir, present)]
    total = sum(w.stat().st_size for w in missing)
    done = 0
    for wheel in missing:
        note(f"sending {wheel.name} ({done / 1e6:.0f}/{total / 1e6:.0f} MB)")
        final, part = f"{remote_dir}/{wheel.name}", f"{remote_dir}/.{wheel.name}.part"
        try:
            sftp.put(str(wheel), part, confirm=True)
            sftp.posix_rename(part, final)
        except (OSError, EOFError) as exc:
            raise TransferError(f"sending {wheel.name} to {conn.target} failed: {exc}",
                                device=conn.device.name, stage="install",
                                hint="run `edgekit device install` again; it resumes") from exc
        done += wheel.stat().st_size
    return tuple(w.name for w in missing), total


def _same_on_board(conn: SshConnection, python: str, wheel: Path, remote_dir: str,
                   present: dict[str, int | None]) -> bool:
    """Index wheels never change under one name, so size is enough; edgekit's own is hashed."""
    if present.get(wheel.name) != wheel.stat().st_size:
        return False
    if not wheel.name.startswith("edgekit-"):
        return True
    script = ("import hashlib, sys; "
              "print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())")
    remote = conn.run(f"{shlex.quote(python)} -c {shlex.quote(script)} "
                      f"{shlex.quote(f'{remote_dir}/{wheel.name}')}")
    return remote.stdout.strip() == hashlib.sha256(wheel.read_bytes()).hexdigest()


def _install(conn: SshConnection, device: Device, base_python: str, venv_python: str,
             wheel_names: list[str], remote_dir: str, note: Step,
             extras: Sequence[WheelSet] = (), reinstall_tvm: bool = False) -> None:
    venv = venv_python.rsplit("/bin/", 1)[0]
    if not conn.exists(venv_python):
        note("creating the venv")
        # --without-pip: Debian's python3 lacks ensurepip unless python3-venv is installed; pip
        # runs from its wheel below instead.
        conn.check(f"{shlex.quote(base_python)} -m venv --without-pip {shlex.quote(venv)}",
                   stage="install", timeout=300,
                   hint="is the venv module there? on Debian: apt-get install python3-venv")
    pip_wheel = next(n for n in wheel_names if n.startswith("pip-"))
    edgekit_wheel = next(n for n in wheel_names if n.startswith("edgekit-"))
    # PIP_CONFIG_FILE=/dev/null and --isolated: the board's own pip settings (an index, proxies,
    # constraints) must not change what gets installed from the pushed files.
    pip = (f"PIP_CONFIG_FILE=/dev/null {shlex.quote(venv_python)} "
           f"{shlex.quote(f'{remote_dir}/{pip_wheel}')}/pip install --isolated --no-index "
           f"--find-links {shlex.quote(remote_dir)} --disable-pip-version-check --quiet")
    note("installing TVM and its dependencies on the board (offline)")
    reqs = " ".join(shlex.quote(r) for r in requirements())
    conn.check(f"{pip} {reqs}", stage="install", timeout=INSTALL_TIMEOUT_S)
    if reinstall_tvm:  # a runtime-only board asked for the full TVM again
        conn.check(f"{pip} --force-reinstall --no-deps {shlex.quote(requirements()[0])}",
                   stage="install", timeout=INSTALL_TIMEOUT_S)
    for extra in extras:
        note(f"installing {', '.join(extra.requirements)} on the board (offline)")
        args = " ".join(shlex.quote(a) for a in extra.install_args())
        conn.check(f"{pip} {args}", stage="install", timeout=INSTALL_TIMEOUT_S)
    note("installing devicekit on the board")
    conn.check(f"{pip} --no-deps --force-reinstall {shlex.quote(f'{remote_dir}/{edgekit_wheel}')}",
               stage="install", timeout=INSTALL_TIMEOUT_S)
