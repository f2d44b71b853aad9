"""The emulated arm64 board, end to end: boot, device info, a cross-compiled module, a wrong-arch
artifact, up and down, through the transport seam and `DeviceSession` as deploy uses them.
Nothing is mocked: a real namespace, qemu and TVM's RPC daemon.

The first run on a machine builds the board image (about 3 minutes on 2 cores); later runs boot
the cached image in about 10 s. Needs root and scripts/setup-board-deps.sh.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hostkit.boards.emulator import EmulatedBoard, board_down, board_status, board_up
from hostkit.boards.image import host_problems, install_devicekit
from hostkit.errors import ConnectError, InventoryError, RemoteError
from hostkit.inventory import Device
from hostkit.run.remote import DeviceSession
from hostkit.transport import make_transport

AARCH64_TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
CROSS_GCC = "aarch64-linux-gnu-gcc"


def _device(host: str, name: str = "emu-unit") -> Device:
    return Device(name=name, target=AARCH64_TARGET, host=host, managed="qemu-arm64")


# Unit tests: no root, no board.

@pytest.mark.parametrize("host, message", [
    ("127.0.0.1", "cannot be a board address"),
    ("169.254.42.0", "use 169.254.42.1 or 169.254.42.2 of 169.254.42.0/30"),
    ("169.254.42.3", "cannot be a board address"),
    ("pi4.local", "needs an IPv4 address, e.g. 169.254.42.2"),
])
def test_board_address_must_be_a_usable_ipv4_of_its_slash_30(host: str, message: str) -> None:
    with pytest.raises(InventoryError, match=message):
        EmulatedBoard.for_device(_device(host))


def test_host_side_takes_the_other_address_of_the_slash_30() -> None:
    assert EmulatedBoard.for_device(_device("169.254.42.2")).host_ip == "169.254.42.1"
    assert EmulatedBoard.for_device(_device("169.254.42.5")).host_ip == "169.254.42.6"


def test_names_fit_linux_interface_names() -> None:
    board = EmulatedBoard.for_device(_device("169.254.42.2", "pi4-emu"))
    assert (board.netns, board.host_veth) == ("ek-pi4-emu", "ek-pi4-emu-h")
    long = EmulatedBoard.for_device(_device("169.254.42.2", "a-very-long/device.name"))
    assert len(long.host_veth) <= 15 and long.netns.startswith("ek-a-ver")


def test_only_qemu_arm64_devices_are_emulated() -> None:
    device = Device(name="pi4", target="raspberry-pi/4b-aarch64", host="169.254.42.2")
    with pytest.raises(InventoryError, match="managed: none, not qemu-arm64"):
        EmulatedBoard.for_device(device)


def test_missing_tools_name_their_debian_package(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    problems = "\n".join(host_problems())
    if shutil.which("debootstrap", path="/usr/local/sbin:/usr/sbin:/sbin") is None:
        assert "`debootstrap`, which is not installed (apt-get install debootstrap)" in problems
    assert "(apt-get install qemu-user-static)" in problems


def test_devicekit_is_copied_onto_the_board_only_when_it_changed(tmp_path: Path) -> None:
    app = tmp_path / "app"
    assert install_devicekit(app) is True
    assert (app / "devicekit" / "server.py").is_file()
    assert list(app.glob("edgekit-*.dist-info/METADATA"))
    assert install_devicekit(app) is False
    (app / "devicekit.sha256").write_text("older", encoding="utf-8")
    assert install_devicekit(app) is True


# Integration tests: the board itself, booted once for the session (tests/conftest.py).

def _tiny_module() -> Any:
    """(x + y, x * y) on 8 floats: a tuple output, which over RPC needs the VM's stateful API."""
    from tvm.script import ir as I
    from tvm.script import relax as R

    @I.ir_module
    class Tiny:
        @R.function
        def main(x: R.Tensor((8,), "float32"),  # type: ignore[valid-type]
                 y: R.Tensor((8,), "float32")):  # type: ignore[valid-type]
            with R.dataflow():
                total = R.add(x, y)
                product = R.multiply(x, y)
                out = (total, product)
                R.output(out)
            return out

    return Tiny


X = np.arange(8, dtype="float32")
Y = np.full(8, 0.5, dtype="float32")


def _export(path: Path, target: dict[str, Any] | str, fcompile: Any = None) -> str:
    import tvm

    executable = tvm.compile(_tiny_module(), target=tvm.target.Target(target))
    if fcompile is None:
        executable.export_library(str(path))
    else:
        executable.export_library(str(path), fcompile=fcompile)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run_on_board(device: Device, path: Path, sha256: str) -> list[np.ndarray]:
    """Send, load and run an artifact through the transport seam and the device session."""
    with make_transport(device) as transport:
        session = DeviceSession(transport, transport.session())
        try:
            session.ensure_artifact(path, sha256)
            outputs, _ = session.load(sha256).run([X, Y])
        finally:
            session.close()  # the daemon serves one session at a time
        return outputs


def _device_info(device: Device) -> dict[str, Any]:
    with make_transport(device) as transport:
        session = DeviceSession(transport, transport.session())
        try:
            return session.info()
        finally:
            session.close()


@pytest.fixture
def cross_gcc() -> Any:
    if shutil.which(CROSS_GCC) is None:
        pytest.skip(f"{CROSS_GCC} is not installed (apt-get install gcc-aarch64-linux-gnu)")
    from tvm.support import cc

    return cc.cross_compiler(CROSS_GCC)


@pytest.mark.integration
def test_board_reports_aarch64(emulated_board: Device) -> None:
    import tvm

    info = _device_info(emulated_board)
    assert info["arch"] == "aarch64"
    assert info["cpu"].startswith("qemu-aarch64 on ")
    assert info["hostname"] == emulated_board.name
    assert info["tvm_version"] == tvm.__version__
    assert board_status(emulated_board)["state"] == "running"


@pytest.mark.integration
def test_cross_compiled_module_runs_on_the_board(emulated_board: Device, cross_gcc: Any,
                                                 tmp_path: Path) -> None:
    path = tmp_path / "tiny.so"
    sha256 = _export(path, AARCH64_TARGET, cross_gcc)
    started = time.perf_counter()
    total, product = _run_on_board(emulated_board, path, sha256)
    print(f"tiny module round trip on the board: {time.perf_counter() - started:.2f}s")
    np.testing.assert_allclose(total, X + Y)
    np.testing.assert_allclose(product, X * Y)


@pytest.mark.integration
@pytest.mark.slow
def test_tar_artifact_is_linked_by_the_boards_own_gcc(emulated_board: Device,
                                                      tmp_path: Path) -> None:
    path = tmp_path / "tiny.tar"
    sha256 = _export(path, AARCH64_TARGET)
    total, _ = _run_on_board(emulated_board, path, sha256)
    np.testing.assert_allclose(total, X + Y)


@pytest.mark.integration
def test_x86_64_artifact_fails_clearly_and_the_board_keeps_serving(emulated_board: Device,
                                                                   tmp_path: Path) -> None:
    path = tmp_path / "host.so"
    sha256 = _export(path, {"kind": "llvm"})
    with make_transport(emulated_board) as transport:
        session = DeviceSession(transport, transport.session())
        session.ensure_artifact(path, sha256)
        with pytest.raises(RemoteError, match=r"built for x86_64 but this device is aarch64; "
                                              r"check the device's target in the inventory"):
            session.load(sha256)
        assert session.info()["arch"] == "aarch64"
        session.close()
    assert _device_info(emulated_board)["arch"] == "aarch64"


@pytest.mark.integration
def test_up_is_idempotent(emulated_board: Device) -> None:
    pid = board_status(emulated_board)["pid"]
    assert board_up(emulated_board) == (emulated_board.host, emulated_board.port)
    assert board_status(emulated_board)["pid"] == pid


@pytest.mark.integration
def test_the_transport_boots_a_board_it_needs_and_stops_it(emulated_board: Device) -> None:
    # A second board beside the session's one, on its own /30; nothing answers before it boots.
    device = Device(name="emu-auto", target=AARCH64_TARGET, host="169.254.42.9",
                    managed="qemu-arm64", session_timeout=120.0)
    board = EmulatedBoard.for_device(device)
    assert not board.running() and board_status(device)["state"] == "stopped"
    with make_transport(device) as transport:
        assert transport.address == "169.254.42.9:9090 (started by edgekit)"
        session = DeviceSession(transport, transport.session())
        assert session.info()["hostname"] == "emu-auto"
        session.close()
    assert board_status(device)["state"] == "stopped"
    assert not Path("/run/netns", board.netns).exists()
    board_down(device)  # stopping a stopped board is fine


@pytest.mark.integration
def test_down_removes_the_namespace_and_up_boots_the_cached_image(emulated_board: Device) -> None:
    board = EmulatedBoard.for_device(emulated_board)
    board_down(emulated_board)
    assert not Path("/run/netns", board.netns).exists()
    assert not Path("/sys/class/net", board.host_veth).exists()
    assert board_status(emulated_board)["state"] == "stopped"
    board_down(emulated_board)
    started = time.perf_counter()
    board_up(emulated_board)
    info = _device_info(emulated_board)
    print(f"cached boot to first RPC answer: {time.perf_counter() - started:.1f}s")
    assert info["arch"] == "aarch64"


@pytest.mark.integration
def test_start_errors_are_one_clear_line(emulated_board: Device) -> None:
    # A second board on the same /30 as the running one is refused before anything is created.
    clash = Device(name="emu-clash", target=AARCH64_TARGET, host=emulated_board.host,
                   managed="qemu-arm64")
    with pytest.raises(ConnectError, match=r"169\.254\.42\.4/30 is already used by interface "
                                           r"ek-emu-test-h"):
        board_up(clash)
    assert not Path("/run/netns/ek-emu-clash").exists()
