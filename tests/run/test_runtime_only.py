"""Integration: a device side with TVM's runtime alone, as `edgekit device install --runtime-only`
leaves a board: the daemon serves CPU models end to end, and says why it cannot run CUDA.

The runtime-only environment is a venv whose TVM is this one's, hard-linked (no copy of 300 MB),
with `edgekit-device strip-compiler` run in it: `libtvm_compiler.so` is gone, not merely unused.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any, Iterator

import pytest
from conftest import Daemon

from hostkit.cli import main

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def runtime_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A venv whose TVM has no compiler: its python and what strip-compiler reported."""
    import tvm

    root = tmp_path_factory.mktemp("runtime-only")
    venv = root / "venv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv",
                    "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], capture_output=True, text=True, check=True)
                .stdout.strip())
    ours = Path(tvm.__file__).parent.parent
    for package in ("tvm", "tvm_ffi", *[p.name for p in ours.glob("apache_tvm-*.dist-info")]):
        shutil.copytree(ours / package, site / package, copy_function=os.link)
    # numpy, psutil, cloudpickle from this venv, after the venv's own (runtime-only) TVM.
    (site / "host-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    stripped = subprocess.run([python, "-m", "devicekit", "strip-compiler"], capture_output=True,
                              text=True, timeout=300, env=os.environ)
    assert stripped.returncode == 0, stripped.stderr
    yield {"python": python, "report": json.loads(stripped.stdout), "site": site}


def test_strip_compiler_leaves_a_runtime_only_tvm(runtime_only: dict[str, Any]) -> None:
    report = runtime_only["report"]
    assert report["compiler"] == ["libtvm_compiler.so"] and report["removed"]
    saved = report["before_bytes"] - report["after_bytes"]
    assert saved > 100e6, f"only {saved / 1e6:.0f} MB removed"
    assert not list((runtime_only["site"] / "tvm" / "lib").glob("libtvm_compiler*"))
    probe = subprocess.run([runtime_only["python"], "-c",
                            "import tvm; print(tvm.__file__, tvm.base._RUNTIME_ONLY)"],
                           capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    path, flag = probe.stdout.split()
    assert path.startswith(str(runtime_only["site"])) and flag == "True"
    print(f"runtime-only install: {report['before_bytes'] / 1e6:.0f} MB -> "
          f"{report['after_bytes'] / 1e6:.0f} MB")
    again = subprocess.run([runtime_only["python"], "-m", "devicekit", "strip-compiler"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    second = json.loads(again.stdout)
    assert second["compiler"] == [] and not second["removed"]
    assert second["after_bytes"] == report["after_bytes"]
    assert second["full_bytes"] == report["full_bytes"] == report["before_bytes"], \
        "the size with the compiler is known from the wheel's RECORD once the file is gone"


def test_runtime_only_daemon_serves_cpu_models(runtime_only: dict[str, Any], tmp_path: Path,
                                               write_inventory: Any,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    daemon = Daemon(tmp_path, python=runtime_only["python"])
    try:
        inv = write_inventory({"devices": {
            "bare": {"target": {"kind": "llvm"}, "host": "127.0.0.1", "port": daemon.port},
            "bare-tar": {"target": {"kind": "llvm"}, "host": "127.0.0.1", "port": daemon.port,
                         "format": "tar"}}})
        for device in ("bare", "bare-tar"):
            code = main(["deploy", "-i", str(inv), "--device", device, "tinycnn", "--json",
                         "--repeat", "3", "--input-shape", "1,3,36,36"])
            result = json.loads(capsys.readouterr().out)
            assert code == 0 and result["status"] == "ok", (result["error"], daemon.logs())
            assert result["max_abs_diff"] < 1e-4 and result["top1_match"]
            assert result["device_info"]["tvm_runtime_only"] is True
    finally:
        daemon.stop()


@pytest.mark.skipif(ctypes.util.find_library("cuda") is not None,
                    reason="this machine has an NVIDIA driver: CUDA would load")
def test_runtime_only_daemon_says_why_it_cannot_run_cuda(runtime_only: dict[str, Any],
                                                          tmp_path: Path) -> None:
    from hostkit.errors import RemoteError
    from hostkit.inventory import Device
    from hostkit.run.remote import DeviceSession
    from hostkit.transport import make_transport

    daemon = Daemon(tmp_path, python=runtime_only["python"])
    try:
        device = Device(name="bare", target={"kind": "cuda"}, port=daemon.port)
        with make_transport(device) as transport:
            session = DeviceSession(transport, transport.session())
            assert session.info()["gpus"] == []
            with pytest.raises(RemoteError) as info:
                session.load("0" * 64, "cuda")
            session.close()
    finally:
        daemon.stop()
    message = str(info.value)
    assert "cannot run cuda kernels: libtvm_runtime_cuda.so did not load" in message
    assert "NVIDIA driver" in message and "\n" not in message
