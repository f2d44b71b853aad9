"""`--runtime cpp`: the export bundle's C++ runner on the device, beside the Python daemon.

The bundle is exported for the device (the model library comes from the same cache the deploy
used), shipped and run where the device runs programs: this machine for `local` (a subprocess
with an empty environment), the emulated board's root filesystem for `qemu-arm64` (in its network
namespace, with nothing but the bundle on PATH), a work folder over SSH for `transport: ssh`. A
device reached over RPC alone has no way to start a program, so it is one clear error. The
runner's outputs are checked against PyTorch like the daemon's, and its own timings are kept.
"""

from __future__ import annotations

import contextlib
import shlex
import shutil
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

from hostkit.errors import RemoteError
from hostkit.export import export_bundle
from hostkit.export.runner import RUNNER_NAME
from hostkit.inventory import Device
from hostkit.models import LoadedModel
from hostkit.report.results import CppRun, Latency
from hostkit.run.check import Check, compare_outputs

__all__ = ["run_cpp", "parse_runner_output", "check_cpp_runnable"]

RUN_TIMEOUT_S = 3600.0
Args = Callable[[str], list[str]]  # the runner's arguments, given where the bundle is


def check_cpp_runnable(device: Device) -> None:
    """A RemoteError unless edgekit can start a program on the device."""
    if device.managed in ("local", "qemu-arm64") or device.transport == "ssh":
        return
    raise RemoteError(f"--runtime cpp starts the runner as a program on the device, but "
                      f"{device.name} is reached over {device.transport} only", device=device.name,
                      stage="cpp", hint="use transport: ssh, or copy an `edgekit export` bundle "
                                        "there and run it")


def run_cpp(device: Device, model: LoadedModel, reference: list[np.ndarray], repeat: int,
            warmup: int, use_tuning: bool = True,
            export_lock: threading.Lock | None = None) -> tuple[CppRun, Check]:
    """Export, ship and run the bundle on the device; its outputs compared with `reference`.

    `export_lock` is held while the bundle is exported: compiles already use every core.
    """
    check_cpp_runnable(device)
    with tempfile.TemporaryDirectory(prefix="edgekit-cpp-") as tmp:
        with export_lock or contextlib.nullcontext():
            bundle = export_bundle(device, model, Path(tmp) / "bundle", use_tuning=use_tuning)
        out = Path(tmp) / "out"
        out.mkdir()

        def args(where: str) -> list[str]:
            """The runner's arguments with the bundle at `where` on the device."""
            inputs = [f"{where}/sample/input{i}.npy" for i in range(len(model.inputs))]
            return [*inputs, "--repeat", str(repeat), "--warmup", str(warmup),
                    "--out", f"{where}/out"]

        if device.managed == "local":
            stdout = _run_local(bundle.path, args, out, device)
        elif device.managed == "qemu-arm64":
            stdout = _run_emulated(bundle.path, args, out, device)
        else:
            stdout = _run_ssh(bundle.path, args, out, device)
        # As many as the runner wrote: a count unlike PyTorch's is the check's to name.
        count = len(list(out.glob("output*.npy")))
        outputs = [np.load(out / f"output{i}.npy") for i in range(count)]
        run = parse_runner_output(stdout, bundle.size)
    check = compare_outputs(outputs, reference)
    run.max_abs_diff, run.rel_err = check.max_abs_diff, check.rel_err
    return run, check


def parse_runner_output(stdout: str, bundle_bytes: int) -> CppRun:
    """The runner's `load_ms`, `first_inference_ms` and `latency_ms k=v ...` lines."""
    run = CppRun(bundle_bytes=bundle_bytes)
    for line in stdout.splitlines():
        key, _, rest = line.partition(" ")
        if key == "load_ms":
            run.load_ms = float(rest)
        elif key == "first_inference_ms":
            run.first_inference_ms = float(rest)
        elif key == "latency_ms":
            stats = dict(item.split("=", 1) for item in rest.split())
            run.latency_ms = Latency(p50=float(stats["p50"]), p90=float(stats["p90"]),
                                     mean=float(stats["mean"]), std=float(stats["std"]),
                                     n=int(stats["n"]))
    return run


def _failed(code: int, stderr: str, device: Device) -> RemoteError:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()] or ["(no output)"]
    return RemoteError(f"the C++ runner exited with code {code}: {lines[-1][:300]}",
                       device=device.name, stage="cpp")


def _run_local(bundle: Path, args: Args, out: Path, device: Device) -> str:
    (bundle / "out").mkdir()
    cmd = [str(bundle / RUNNER_NAME), *args(str(bundle))]
    try:
        done = subprocess.run(cmd, cwd=bundle, env={"PATH": str(bundle)}, capture_output=True,
                              text=True, timeout=RUN_TIMEOUT_S, stdin=subprocess.DEVNULL,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RemoteError(f"the C++ runner did not run: {exc}", device=device.name,
                          stage="cpp") from exc
    if done.returncode != 0:
        raise _failed(done.returncode, done.stderr, device)
    _collect(bundle / "out", out)
    return done.stdout


def _collect(results: Path, out: Path) -> None:
    for result in results.glob("output*.npy"):
        shutil.copyfile(result, out / result.name)


def _run_emulated(bundle: Path, args: Args, out: Path, device: Device) -> str:
    """Inside the board's root filesystem and network namespace, PATH holding only the bundle."""
    from hostkit.boards.emulator import EmulatedBoard
    from hostkit.boards.image import chroot_shell, image_rootfs

    board = EmulatedBoard.for_device(device)
    rootfs = image_rootfs()
    inside = f"{board.board_dir}/bundles/{uuid.uuid4().hex[:12]}"
    host_side = rootfs / inside.lstrip("/")
    shutil.copytree(bundle, host_side)
    (host_side / "out").mkdir()
    try:
        prefix = ["ip", "netns", "exec", board.netns] if board.running() else []
        cmd = chroot_shell(rootfs, [f"{inside}/{RUNNER_NAME}", *args(inside)],
                           env={"PATH": inside}, prefix=prefix)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                              stdin=subprocess.DEVNULL, check=False)
        if done.returncode != 0:
            raise _failed(done.returncode, done.stderr, device)
        _collect(host_side / "out", out)
        return done.stdout
    finally:
        shutil.rmtree(host_side, ignore_errors=True)


def _run_ssh(bundle: Path, args: Args, out: Path, device: Device) -> str:
    """In a fresh folder under the device's ssh.work_dir, removed afterwards."""
    from hostkit.transport.sshconn import SshConnection

    with SshConnection(device).connect() as conn:
        remote = f"{conn.work_dir}/bundles/{uuid.uuid4().hex[:12]}"
        conn.check(f"mkdir -p {shlex.quote(remote)}/sample {shlex.quote(remote)}/out", "cpp")
        try:
            sftp = conn.sftp()
            for path in sorted(bundle.rglob("*")):
                if path.is_file():
                    target = f"{remote}/{path.relative_to(bundle)}"
                    sftp.put(str(path), target)
                    sftp.chmod(target, path.stat().st_mode & 0o777)
            result = conn.run(f"env -i {shlex.quote(remote)}/{RUNNER_NAME} "
                              f"{shlex.join(args(remote))}", timeout=RUN_TIMEOUT_S)
            if result.code != 0:
                raise _failed(result.code, result.stderr, device)
            for name in sftp.listdir(f"{remote}/out"):
                sftp.get(f"{remote}/out/{name}", str(out / name))
            return result.stdout
        finally:
            conn.run(f"rm -rf {shlex.quote(remote)}")
