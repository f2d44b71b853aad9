"""The emulated board's root filesystem: Debian arm64, built once with debootstrap and cached.

The image holds Debian's python3, gcc and libc6-dev (the board links `.tar` artifacts itself) and a
venv at /opt/edgekit/venv with devicekit's dependencies, installed offline from aarch64 wheels the
host downloads. It is keyed by a hash of those inputs and built in a temporary folder renamed into
place at the end, so an interrupted build never leaves a half board. edgekit's own code is not in
the image: `install_devicekit` copies it in at every start, so editing devicekit costs no rebuild.

Every step that mounts something (debootstrap, the chroot steps) runs in its own mount namespace,
so its mounts vanish with it even when the build is killed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

from hostkit.defaults import cache_dir
from hostkit.engines import board_wheels
from hostkit.errors import ConnectError

__all__ = ["Progress", "BOARD_VENV", "IMAGES_ENV", "check_host", "host_problems", "ensure_binfmt",
           "image_key", "images_dir", "image_rootfs", "ensure_image", "install_devicekit",
           "chroot_shell", "run_step", "mounts_under"]

log = logging.getLogger("edgekit.board")

Progress = Callable[[str], None]

# Bump when the build steps change in a way the inputs below do not show.
RECIPE = 1
SUITE = "bookworm"
ARCH = "arm64"
PACKAGES = ("python3", "python3-venv", "gcc", "libc6-dev")
# bookworm's python3 is 3.11; the wheels must match it.
BOARD_PYTHON = "3.11"
WHEEL_PLATFORM = "manylinux_2_28_aarch64"  # pip also accepts the older manylinux tags below it
DEFAULT_MIRROR = "http://deb.debian.org/debian"
MIRROR_ENV = "EDGEKIT_DEBIAN_MIRROR"
IMAGES_ENV = "EDGEKIT_BOARD_IMAGES"
# EDGEKIT_BOARD_RUNTIME_ONLY=1: an image whose TVM has no compiler (a key of its own, so the
# default image is not rebuilt). Opt-in until a runtime-only board has run the board tests.
RUNTIME_ONLY_ENV = "EDGEKIT_BOARD_RUNTIME_ONLY"
BOARD_VENV = "/opt/edgekit/venv"
BOARD_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"

BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
QEMU_BINFMT_CONF = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")
# Used when qemu-user-static ships no binfmt.d file. F: the kernel opens the interpreter now, so
# it works inside the chroot without a copy of qemu there.
QEMU_BINFMT_FALLBACK = (
    r":qemu-aarch64:M::\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00"
    r"\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
    r":/usr/bin/qemu-aarch64-static:F"
)
# Tools the emulated board needs on the host, with the Debian package that provides each.
HOST_TOOLS = {
    "debootstrap": "debootstrap",
    "qemu-aarch64-static": "qemu-user-static",
    "ip": "iproute2",
    "unshare": "util-linux",
    "chroot": "coreutils",
    "mount": "mount",
}


def _which(tool: str) -> str | None:
    path = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"
    return shutil.which(tool, path=path)


def host_problems(tools: Iterable[str] = tuple(HOST_TOOLS)) -> list[str]:
    """Why this host cannot run the emulated board (or the named tools); empty when it can."""
    problems = []
    if os.geteuid() != 0:
        problems.append("the emulated board needs root (network namespaces, chroot, binfmt_misc); "
                        "run edgekit as root or use a real board")
    if sys.platform != "linux":
        problems.append("the emulated board needs Linux")
    for tool in tools:
        if _which(tool) is None:
            problems.append(f"the emulated board needs `{tool}`, which is not installed "
                            f"(apt-get install {HOST_TOOLS[tool]})")
    return problems


def check_host(device: str | None = None, tools: Iterable[str] = tuple(HOST_TOOLS)) -> None:
    problems = host_problems(tools)
    if problems:
        raise ConnectError(problems[0], device=device, stage="board")


def run_step(cmd: list[str], what: str, device: str | None, logfile: Path | None = None,
             timeout: float = 1800) -> str:
    """Run one host command; a failure is a ConnectError naming it with its last lines of output."""
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        raise ConnectError(f"{what} did not finish within {timeout:.0f}s", device=device,
                           stage="board") from exc
    output = (done.stdout + done.stderr).decode(errors="replace")
    if logfile is not None:
        with open(logfile, "a", encoding="utf-8") as handle:
            handle.write(f"$ {shlex.join(cmd)}\n{output}\n")
    if done.returncode != 0:
        tail = " | ".join(line.strip() for line in output.strip().splitlines()[-3:])
        where = f"; full log in {logfile}" if logfile else ""
        raise ConnectError(f"{what} failed with exit code {done.returncode}: {tail}{where}",
                           device=device, stage="board")
    return output


def ensure_binfmt(device: str | None = None) -> None:
    """Let the kernel run aarch64 programs through qemu-aarch64-static (F flag: in chroots too)."""
    if not (BINFMT_DIR / "register").exists():
        run_step(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)],
                 "mounting binfmt_misc", device)
    entry = BINFMT_DIR / "qemu-aarch64"
    if not entry.exists():
        line = QEMU_BINFMT_FALLBACK
        if QEMU_BINFMT_CONF.exists():
            lines = [x.strip() for x in QEMU_BINFMT_CONF.read_text(encoding="utf-8").splitlines()]
            line = next((x for x in lines if x.startswith(":")), line)
        try:
            (BINFMT_DIR / "register").write_text(line, encoding="utf-8")
        except OSError as exc:
            raise ConnectError(f"cannot register qemu-aarch64 with binfmt_misc: {exc}",
                               device=device, stage="board") from exc
    text = entry.read_text(encoding="utf-8").splitlines()
    flags = next((x.split(":", 1)[1] for x in text if x.startswith("flags:")), "")
    if text[:1] != ["enabled"] or "F" not in flags:
        raise ConnectError("binfmt_misc has qemu-aarch64 disabled or without the F flag, so it "
                           "cannot run inside a chroot", device=device, stage="board",
                           hint=f"echo -1 > {entry} and try again to let edgekit register it")


def _device_requirements() -> list[str]:
    """The device side's dependencies, as the installed edgekit declares them (no extras)."""
    try:
        requires = metadata.requires("edgekit") or []
    except metadata.PackageNotFoundError as exc:
        raise ConnectError("edgekit is not installed, so the board's dependencies are unknown",
                           stage="board", hint="pip install -e . in the edgekit checkout") from exc
    return sorted(r.strip() for r in requires if "extra" not in r.partition(";")[2])


def _inputs(baselines: tuple[str, ...] = ()) -> dict[str, object]:
    inputs: dict[str, object] = {
        "recipe": RECIPE, "suite": SUITE, "arch": ARCH, "packages": list(PACKAGES),
        "python": BOARD_PYTHON, "platform": WHEEL_PLATFORM,
        "requirements": _device_requirements()}
    if baselines:  # only then: the lean default image keeps its key
        inputs["baselines"] = [list(w.download_args()) for w in board_wheels(baselines)]
    if _runtime_only():
        inputs["runtime_only"] = True
    return inputs


def _runtime_only() -> bool:
    return os.environ.get(RUNTIME_ONLY_ENV) == "1"


def image_key(baselines: tuple[str, ...] = ()) -> str:
    """The image's identity: a hash of everything that goes into it (baseline engines too)."""
    blob = json.dumps(_inputs(baselines), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def images_dir() -> Path:
    """Where board images are kept: about 1 GiB each, so shared even by runs that isolate their
    cache with EDGEKIT_CACHE (the test suite does); EDGEKIT_BOARD_IMAGES overrides."""
    explicit = os.environ.get(IMAGES_ENV)
    return Path(explicit) if explicit else cache_dir() / "boards" / "images"


def image_rootfs(key: str | None = None) -> Path:
    return images_dir() / (key or image_key()) / "rootfs"


def chroot_shell(rootfs: Path, argv: Sequence[str], setup: Sequence[str] = (),
                 env: Mapping[str, str] | None = None, prefix: Sequence[str] = (),
                 unshare: Sequence[str] = ()) -> list[str]:
    """A command running argv in the chroot, in a private mount namespace with /proc mounted.

    `setup` lines run outside the chroot first (more mounts); `env` is the whole environment
    inside, so the host's settings (PIP_*, PYTHON*) never leak into the board. `prefix` wraps the
    whole command (`ip netns exec NS`); `unshare` adds namespaces (`--uts`).
    """
    root = shlex.quote(str(rootfs))
    inside = {"HOME": "/root", "PATH": BOARD_PATH, "LANG": "C.UTF-8", **(env or {})}
    script = "\n".join(["set -e", f"mount -t proc proc {root}/proc", *setup,
                        f"exec chroot {root} /usr/bin/env -i "
                        + shlex.join([f"{k}={v}" for k, v in inside.items()] + list(argv))])
    return [*prefix, "unshare", "--mount", *unshare, "--propagation", "private", "--",
            "sh", "-c", script]


@contextmanager
def _locked(path: Path, progress: Progress) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress("waiting for another edgekit process building the same board image")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below path in this mount namespace."""
    prefix = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as info:
        for line in info:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found


def _remove_build(path: Path) -> None:
    """Delete an abandoned build folder, never through something mounted inside it."""
    mounted = mounts_under(path)
    if mounted:
        raise ConnectError(f"{path} still has mounts inside ({', '.join(mounted)}); "
                           "unmount them, then try again", stage="board")
    shutil.rmtree(path)


def _pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def ensure_image(progress: Progress | None = None, device: str | None = None,
                 baselines: tuple[str, ...] = ()) -> Path:
    """The cached rootfs for the current inputs, building it first if it is missing (minutes).

    `baselines` adds those engines (`hostkit.engines`) to the board's venv: an image of its own,
    so the default image, and CI with it, stay lean.
    """
    say = progress or log.info
    key = image_key(baselines)
    final = images_dir() / key
    if (final / "rootfs").is_dir():
        return final / "rootfs"
    check_host(device)
    with _locked(images_dir() / f"{key}.lock", say):
        if (final / "rootfs").is_dir():  # another process built it while we waited
            return final / "rootfs"
        for stale in images_dir().glob(".build-*"):
            if not _pid_alive(int(stale.name.rsplit("-", 1)[1])):
                say(f"removing the interrupted board build {stale.name}")
                _remove_build(stale)
        work = images_dir() / f".build-{key}-{os.getpid()}"
        work.mkdir(parents=True)
        try:
            _build(work, key, say, device, baselines)
            os.rename(work, final)
        except BaseException:
            if not mounts_under(work):
                shutil.rmtree(work, ignore_errors=True)
            raise
    return final / "rootfs"


def _build(work: Path, key: str, say: Progress, device: str | None,
           baselines: tuple[str, ...] = ()) -> None:
    started = time.monotonic()
    buildlog = work / "build.log"
    requirements = _device_requirements()
    ensure_binfmt(device)
    say(f"board image {key}: downloading aarch64 wheels for {', '.join(requirements)}")
    wheels = work / "wheels"
    run_step([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
              "--platform", WHEEL_PLATFORM, "--python-version", BOARD_PYTHON,
              "--dest", str(wheels), *requirements], "downloading the board's wheels", device,
             buildlog)
    extras = board_wheels(baselines)
    for extra in extras:
        say(f"board image {key}: downloading aarch64 wheels for {', '.join(extra.requirements)}")
        run_step([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
                  "--platform", WHEEL_PLATFORM, "--python-version", BOARD_PYTHON,
                  "--dest", str(wheels), *extra.download_args()],
                 "downloading the board's baseline wheels", device, buildlog)
    wheel_names = sorted(p.name for p in wheels.glob("*.whl"))
    mirror = os.environ.get(MIRROR_ENV, DEFAULT_MIRROR)
    say(f"board image {key}: debootstrap {SUITE} {ARCH} from {mirror} (a few minutes)")
    rootfs = work / "rootfs"
    run_step(["unshare", "--mount", "--propagation", "private", "--", "debootstrap",
              f"--arch={ARCH}", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE,
              str(rootfs), mirror], f"debootstrap of Debian {SUITE} {ARCH}", device, buildlog)
    os.rename(wheels, rootfs / "opt" / "edgekit-wheels")
    say(f"board image {key}: installing the wheels into {BOARD_VENV} (offline, under qemu)")
    run_step(chroot_shell(rootfs, ["python3", "-m", "venv", BOARD_VENV]),
             "creating the board's venv", device, buildlog)
    run_step(chroot_shell(rootfs, [f"{BOARD_VENV}/bin/pip", "install", "--quiet", "--no-index",
                                   "--find-links", "/opt/edgekit-wheels", *requirements]),
             "installing the board's wheels", device, buildlog)
    for extra in extras:
        say(f"board image {key}: installing {', '.join(extra.requirements)} (offline, under qemu)")
        run_step(chroot_shell(rootfs, [f"{BOARD_VENV}/bin/pip", "install", "--quiet",
                                       "--no-index", "--find-links", "/opt/edgekit-wheels",
                                       *extra.install_args()]),
                 "installing the board's baseline engines", device, buildlog)
    say(f"board image {key}: checking that TVM imports on the board")
    version = run_step(chroot_shell(rootfs, [f"{BOARD_VENV}/bin/python", "-c",
                                             "import tvm, numpy, cloudpickle, psutil; "
                                             "print(tvm.__version__)"]),
                       "importing TVM on the board", device, buildlog).strip()
    for engine in baselines:  # engine names are their modules' names (devicekit.baselines)
        run_step(chroot_shell(rootfs, [f"{BOARD_VENV}/bin/python", "-c", f"import {engine}"]),
                 f"importing {engine} on the board", device, buildlog)
    shutil.rmtree(rootfs / "opt" / "edgekit-wheels")
    stripped = None
    if _runtime_only():
        from devicekit.runtime import strip_compiler

        venv = rootfs / BOARD_VENV.lstrip("/")
        stripped = strip_compiler(package=venv / "lib" / f"python{BOARD_PYTHON}" /
                                  "site-packages" / "tvm", prefix=venv)
        say(f"board image {key}: TVM's runtime only, the venv {stripped['before_bytes'] / 1e6:.0f}"
            f" MB -> {stripped['after_bytes'] / 1e6:.0f} MB")
    for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for item in (rootfs / cache).glob("*"):
            if item.is_file():
                item.unlink()
    seconds = time.monotonic() - started
    manifest = {**_inputs(baselines), "key": key, "tvm": version, "build_seconds": round(seconds, 1),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "wheels": wheel_names, "runtime_only": stripped}
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    say(f"board image {key}: ready in {seconds:.0f}s (TVM {version})")


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def install_devicekit(app_dir: Path) -> bool:
    """Copy this host's devicekit into app_dir (the board's PYTHONPATH) if it changed.

    A plain copy plus a minimal dist-info (so `importlib.metadata.version("edgekit")` answers on
    the board) costs milliseconds and works whether edgekit is installed from a checkout or a
    wheel; running pip under qemu would cost seconds on every change. Returns True if it copied.
    """
    import devicekit

    source = Path(devicekit.__file__).parent
    version = devicekit.__version__
    stamp = app_dir / "devicekit.sha256"
    digest = f"{version} {_tree_digest(source)}"
    if stamp.exists() and stamp.read_text(encoding="utf-8") == digest:
        return False
    if app_dir.exists():
        shutil.rmtree(app_dir)
    shutil.copytree(source, app_dir / "devicekit",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    info = app_dir / f"edgekit-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: edgekit\nVersion: {version}\n",
                                   encoding="utf-8")
    (info / "INSTALLER").write_text("edgekit-board\n", encoding="utf-8")
    files = sorted(str(p.relative_to(app_dir)) for p in app_dir.rglob("*") if p.is_file())
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in files)
                                 + f"{info.name}/RECORD,,\n", encoding="utf-8")
    stamp.write_text(digest, encoding="utf-8")
    return True
