"""Integration: the ssh transport against a real OpenSSH server on 127.0.0.1.

The "board" is this machine reached through sshd as the current user, so its files are checked
directly on disk and its sockets with psutil. Nothing is mocked: broken transfers are real
connections cut mid-upload.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import psutil
import pytest
from sshd import Sshd, free_port, sshd_missing, start_sshd, write_inventory

from hostkit.defaults import cache_dir
from hostkit.errors import ConnectError, TransferError
from hostkit.inventory import Device, SshSettings, load_inventory
from hostkit.transport import make_transport
from hostkit.transport.ssh import SshTransport
from hostkit.transport.sshconn import SshConnection

pytestmark = pytest.mark.integration

# The user's cache, read before the session fixture points EDGEKIT_CACHE at a temporary folder:
# the board wheels (hundreds of MB) are downloaded once, not once per test session.
USER_CACHE = cache_dir()
DEBIAN_PYTHON = "/usr/bin/python3"


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    reason = sshd_missing()
    if reason:
        pytest.skip(reason)
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


def _device(tmp_path: Path, sshd: Sshd, **ssh: Any) -> Device:
    ssh.setdefault("python", sys.executable)
    return load_inventory(write_inventory(tmp_path / "inventory.yaml", sshd, **ssh)).get("sshbox")


def _listeners(port: int) -> list[str]:
    return [c.laddr.ip for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port]


def _wait_gone(pid: int, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def _info(transport: Any) -> dict[str, Any]:
    sess = transport.session()
    info: dict[str, Any] = json.loads(sess.get_function("edgekit.device_info")())
    return info


def test_round_trip_daemon_on_loopback_and_close_cleans_up(tmp_path: Path, sshd: Sshd) -> None:
    device = _device(tmp_path, sshd)
    transport = make_transport(device)
    assert isinstance(transport, SshTransport)
    with transport:
        info = _info(transport)
        import tvm

        assert info["tvm_version"] == tvm.__version__
        pid, tunnel = transport.daemon_pid, transport.tunnel
        assert pid is not None and tunnel is not None, "nothing listened, so edgekit started one"
        rpc_port = device.ssh.rpc_port
        assert _listeners(rpc_port) and set(_listeners(rpc_port)) == {"127.0.0.1"}, \
            "the board's daemon listens on its loopback only"
        assert set(_listeners(tunnel.port)) == {"127.0.0.1"}
        assert (Path(device.ssh.work_dir) / "artifacts").is_dir()
        assert "daemon started by edgekit" in transport.address
    assert _wait_gone(pid), "the daemon edgekit started is stopped on close"
    assert not _listeners(device.ssh.rpc_port)
    assert not _listeners(tunnel.port), "no tunnel listener remains"
    assert _wait_gone(tunnel.pid)


def test_attaches_to_a_running_daemon_and_leaves_it(tmp_path: Path, sshd: Sshd) -> None:
    device = _device(tmp_path, sshd)
    with make_transport(device) as first:
        assert isinstance(first, SshTransport) and first.daemon_pid is not None
        _info(first)
        with make_transport(device) as second:
            assert isinstance(second, SshTransport)
            assert second.daemon_pid is None, "a daemon answered, so none was started"
            assert _info(second)["arch"]
        assert psutil.pid_exists(first.daemon_pid), "closing the second leaves the first's daemon"
        assert _info(first)["arch"]


# x * y + x as a Relax module in TVMScript (parsed from text: its annotations are not typing).
TINY_MODULE = """
@I.ir_module
class Tiny:
    @R.function
    def main(x: R.Tensor((4,), "float32"), y: R.Tensor((4,), "float32")):
        with R.dataflow():
            z = R.add(R.multiply(x, y), x)
            R.output(z)
        return z
"""


def _tiny_library(path: Path) -> str:
    """A real TVM library (Relax VM executable, host llvm), exported to path; returns its sha256."""
    import tvm
    from tvm.script import from_source

    executable = tvm.compile(from_source(TINY_MODULE), target=tvm.target.Target({"kind": "llvm"}))
    executable.export_library(str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_put_artifact_then_load_and_run(tmp_path: Path, sshd: Sshd) -> None:
    import tvm
    from tvm import relax

    library = tmp_path / "tiny.so"
    sha = _tiny_library(library)
    device = _device(tmp_path, sshd)
    store = Path(device.ssh.work_dir) / "artifacts"
    seen: list[tuple[int, int]] = []
    with make_transport(device) as transport:
        sess = transport.session()
        transport.put_artifact(sess, library, sha, lambda done, total: seen.append((done, total)))
        assert (store / f"{sha}.so").read_bytes() == library.read_bytes()
        assert not list(store.glob(".*.part")), "no staging file is left behind"
        assert seen and seen[-1] == (library.stat().st_size, library.stat().st_size)
        assert sess.get_function("edgekit.artifact_has")(sha)

        path = sess.get_function("edgekit.artifact_path")(sha)
        dev = sess.cpu()
        vm = relax.VirtualMachine(sess.load_module(path), dev)
        a = np.arange(4, dtype="float32")
        b = np.full(4, 3.0, dtype="float32")
        vm.set_input("main", tvm.runtime.tensor(a, dev), tvm.runtime.tensor(b, dev))
        vm.invoke_stateful("main")
        np.testing.assert_allclose(vm.get_outputs("main").numpy(), a * b + a)


def test_corrupted_upload_never_lands(tmp_path: Path, sshd: Sshd) -> None:
    artifact = tmp_path / "blob.so"
    artifact.write_bytes(os.urandom(3 << 20))
    sha = hashlib.sha256(artifact.read_bytes()).hexdigest()
    device = _device(tmp_path, sshd)
    store = Path(device.ssh.work_dir) / "artifacts"
    with make_transport(device) as transport:
        sess = transport.session()
        wrong = hashlib.sha256(b"something else").hexdigest()
        with pytest.raises(TransferError, match="corrupted"):
            transport.put_artifact(sess, artifact, wrong)
        assert not (store / f"{wrong}.so").exists() and not list(store.glob(".*.part"))

        def cancel(done: int, total: int) -> None:
            if done > total // 3:
                raise KeyboardInterrupt  # the user pressed Ctrl-C mid-upload

        with pytest.raises(KeyboardInterrupt):
            transport.put_artifact(sess, artifact, sha, cancel)
        assert not (store / f"{sha}.so").exists() and not list(store.glob(".*.part"))

    with make_transport(device) as transport:
        assert isinstance(transport, SshTransport) and transport.conn is not None
        ssh_link = transport.conn.transport

        def cut(done: int, total: int) -> None:
            if done > total // 3:
                ssh_link.close()  # the network goes away mid-transfer

        with pytest.raises(TransferError, match="broke"):
            transport.put_artifact(transport.session(), artifact, sha, cut)
    assert not (store / f"{sha}.so").exists(), "a truncated upload never gets the final name"

    with make_transport(device) as transport:
        transport.put_artifact(transport.session(), artifact, sha)
    assert (store / f"{sha}.so").read_bytes() == artifact.read_bytes()
    assert not list(store.glob(".*.part")), "the retry replaced the stale part file"


def test_wrong_key_is_a_clear_auth_error(tmp_path: Path, sshd: Sshd) -> None:
    device = _device(tmp_path, sshd, key_file=str(sshd.stranger_key))
    with pytest.raises(ConnectError) as caught:
        make_transport(device).open()
    text = str(caught.value)
    assert f"{sshd.user}@127.0.0.1:{sshd.port}" in text and "wrong key?" in text
    assert "BEGIN OPENSSH" not in text and len(text.splitlines()) == 1


def test_unknown_host_key_is_refused_with_trust_hint(tmp_path: Path, sshd: Sshd) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("", encoding="utf-8")
    device = _device(tmp_path, sshd, known_hosts=str(empty))
    with pytest.raises(ConnectError) as caught:
        make_transport(device).open()
    text = str(caught.value)
    assert f"ssh-keyscan -p {sshd.port} 127.0.0.1 >> {empty}" in text
    assert "host_key_policy: accept-new" in text
    assert empty.read_text(encoding="utf-8") == "", "strict never writes known_hosts"

    # Following the hint works: trust the key with ssh-keyscan, then connect.
    scan = subprocess.run(["ssh-keyscan", "-p", str(sshd.port), "127.0.0.1"],
                          capture_output=True, text=True, check=True)
    empty.write_text(scan.stdout, encoding="utf-8")
    SshConnection(device).connect().close()


def test_accept_new_saves_the_key_and_a_changed_key_is_refused(tmp_path: Path,
                                                                sshd: Sshd) -> None:
    known = tmp_path / "ssh" / "known_hosts"
    device = _device(tmp_path, sshd, known_hosts=str(known), host_key_policy="accept-new")
    SshConnection(device).connect().close()
    assert known.read_text(encoding="utf-8").split()[:3] == sshd.known_hosts_line().split()[:3]
    strict = _device(tmp_path, sshd, known_hosts=str(known))
    SshConnection(strict).connect().close()

    other = subprocess.run(["ssh-keygen", "-y", "-f", str(sshd.stranger_key)], check=True,
                           capture_output=True, text=True).stdout.split()
    known.write_text(f"[127.0.0.1]:{sshd.port} {other[0]} {other[1]}\n", encoding="utf-8")
    with pytest.raises(ConnectError, match="does not match .*ssh-keygen -R"):
        SshConnection(device).connect()


def _debian_python_lacks_tvm() -> bool:
    if not os.path.exists(DEBIAN_PYTHON):
        return False
    probe = subprocess.run([DEBIAN_PYTHON, "-c", "import tvm"], capture_output=True)
    return probe.returncode != 0


needs_bare_python = pytest.mark.skipif(not _debian_python_lacks_tvm(),
                                       reason=f"needs {DEBIAN_PYTHON} without TVM installed")


@needs_bare_python
def test_python_without_devicekit_suggests_install(tmp_path: Path, sshd: Sshd) -> None:
    device = _device(tmp_path, sshd, python=DEBIAN_PYTHON)
    with pytest.raises(ConnectError, match="edgekit device install --device sshbox"):
        make_transport(device).open()
    assert not _listeners(device.ssh.rpc_port), "no daemon is started with a bad python"


@needs_bare_python
@pytest.mark.slow
def test_install_device_makes_a_bare_board_work(tmp_path: Path, sshd: Sshd,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from hostkit.fleet.provision import install_device

    monkeypatch.setenv("EDGEKIT_CACHE", str(USER_CACHE))
    device = _device(tmp_path, sshd, python=DEBIAN_PYTHON)
    steps: list[str] = []
    start = time.perf_counter()
    first = install_device(device, steps.append)
    first_s = time.perf_counter() - start
    venv_python = f"{device.ssh.work_dir}/venv/bin/python"
    assert first.python == venv_python and steps
    with make_transport(device) as transport:
        assert isinstance(transport, SshTransport) and transport.python == venv_python
        assert _info(transport)["edgekit_version"]

    start = time.perf_counter()
    again = install_device(device, steps.append)
    again_s = time.perf_counter() - start
    assert again.python == venv_python
    # edgekit's own wheel is rebuilt each run and sent only if this checkout changed meanwhile.
    assert not [name for name in again.sent if not name.startswith("edgekit-")], \
        "no dependency wheel is pushed twice"
    print(f"install: first {first_s:.1f}s, again {again_s:.1f}s, {first}")


@needs_bare_python
@pytest.mark.slow
def test_install_baselines_then_onnxruntime_runs_on_the_board(
        tmp_path: Path, sshd: Sshd, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`edgekit device install --baselines onnxruntime` on a bare Python (issue 13): the wheels
    are fetched here, installed offline there, and the board then runs ONNX Runtime beside TVM."""
    from hostkit.cli import main

    monkeypatch.setenv("EDGEKIT_CACHE", str(USER_CACHE))
    inventory = write_inventory(tmp_path / "inventory.yaml", sshd, python=DEBIAN_PYTHON)
    start = time.perf_counter()
    assert main(["device", "install", "-i", str(inventory), "--device", "sshbox",
                 "--baselines", "onnxruntime", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    install_s = time.perf_counter() - start
    assert summary["baselines"] == ["onnxruntime"] and summary["installed"] is True
    assert any(name.startswith("onnxruntime-") for name in summary["sent"])
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache"))
    assert main(["deploy", "-i", str(inventory), "--device", "sshbox", "tinycnn",
                 "--baselines", "onnxruntime,torch", "--json", "--repeat", "3"]) == 0
    record = json.loads(capsys.readouterr().out)
    ort, torch_run = record["baselines"]
    assert record["status"] == "ok" and ort["status"] == "ok", ort["reason"]
    assert ort["rel_err"] <= 1e-4 and ort["tvm_ratio"] > 0
    assert (torch_run["status"], torch_run["reason"]) == ("n/a", "not installed")
    print(f"install with onnxruntime: {install_s:.1f}s")


@needs_bare_python
@pytest.mark.slow
def test_install_runtime_only_leaves_tvm_without_its_compiler(
        tmp_path: Path, sshd: Sshd, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`edgekit device install --runtime-only`: the board's TVM loses its compiler, the daemon
    there runs runtime-only and still deploys; the size before and after is reported."""
    from hostkit.cli import main

    monkeypatch.setenv("EDGEKIT_CACHE", str(USER_CACHE))
    inventory = write_inventory(tmp_path / "inventory.yaml", sshd, python=DEBIAN_PYTHON)
    assert main(["device", "install", "--device", "sshbox", "--runtime-only", "--json",
                 "--inventory", str(inventory)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["runtime_only"] and result["venv_bytes"] < result["venv_bytes_full"] - 100e6
    with capsys.disabled():
        print(f"runtime-only install on the board: {result['venv_bytes_full'] / 1e6:.0f} MB -> "
              f"{result['venv_bytes'] / 1e6:.0f} MB")
    device = load_inventory(inventory).get("sshbox")
    with make_transport(device) as transport:
        assert _info(transport)["tvm_runtime_only"] is True
    code = main(["deploy", "--device", "sshbox", "tinycnn", "--inventory", str(inventory),
                 "--json", "--repeat", "2"])
    deployed = json.loads(capsys.readouterr().out)
    assert code == 0 and deployed["status"] == "ok" and deployed["max_abs_diff"] < 1e-4
    # Installing again without the flag puts the compiler back.
    assert main(["device", "install", "--device", "sshbox", "--json",
                 "--inventory", str(inventory)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["installed"] and not again["runtime_only"]
    with make_transport(device) as transport:
        assert _info(transport)["tvm_runtime_only"] is False


@pytest.mark.slow
def test_deploy_resnet18_over_ssh(tmp_path: Path, sshd: Sshd,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    from hostkit.cli import main

    inventory = write_inventory(tmp_path / "inventory.yaml", sshd, python=sys.executable)
    code = main(["deploy", "--device", "sshbox", "resnet18", "--inventory", str(inventory),
                 "--json", "--repeat", "3"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["status"] == "ok", result.get("error")
    assert result["max_abs_diff"] < 1e-4
    store = tmp_path / "board" / "artifacts"
    assert (store / f"{result['artifact_sha256']}.so").exists()
    assert not list(store.glob(".*.part"))


def test_deploy_detector_over_ssh(tmp_path: Path, sshd: Sshd,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A detector through the ssh tunnel: its data-dependent count of detections comes back as
    the device's VM computed it and is matched one to one against PyTorch."""
    from hostkit.cli import main

    inventory = write_inventory(tmp_path / "inventory.yaml", sshd, python=sys.executable)
    code = main(["deploy", "--device", "sshbox", "ssdlite320_mobilenet_v3_large", "--inventory",
                 str(inventory), "--json", "--repeat", "1", "--warmup", "0"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["status"] == "ok", result.get("error")
    check = result["check"]
    assert check["family"] == "detection" and check["detections"] >= 10
    assert check["matched"] == check["detections"] == check["device_detections"]
    assert (tmp_path / "board" / "artifacts" / f"{result['artifact_sha256']}.so").exists()


def test_deploy_runtime_cpp_over_ssh(tmp_path: Path, sshd: Sshd,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The export bundle goes by SFTP into a fresh folder, runs with an empty environment and is
    removed afterwards; its outputs are checked against PyTorch beside the daemon's."""
    from hostkit.cli import main

    inventory = write_inventory(tmp_path / "inventory.yaml", sshd, python=sys.executable)
    code = main(["deploy", "--device", "sshbox", "tinycnn", "--inventory", str(inventory),
                 "--json", "--repeat", "5", "--runtime", "cpp"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["status"] == "ok", result.get("error")
    assert result["cpp"]["rel_err"] < 1e-4 and result["cpp"]["latency_ms"]["n"] == 5
    assert list((tmp_path / "board" / "bundles").iterdir()) == []


def test_doctor_ssh_device_all_ok(tmp_path: Path, sshd: Sshd) -> None:
    from hostkit.fleet.doctor import diagnose

    device = _device(tmp_path, sshd)
    checks = diagnose(device)
    assert [c.name for c in checks] == ["address", "tcp", "ssh login", "remote python",
                                        "devicekit", "tvm version", "daemon", "rpc", "target",
                                        "toolchain"]
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    assert "not running; edgekit starts it" in checks[6].detail
    assert not _listeners(device.ssh.rpc_port), "doctor stops what it started"


def test_doctor_explains_a_refused_login_and_still_checks_the_toolchain(tmp_path: Path,
                                                                        sshd: Sshd) -> None:
    from hostkit.fleet.doctor import diagnose

    checks = {c.name: c for c in diagnose(_device(tmp_path, sshd, key_file=str(sshd.stranger_key)))}
    assert checks["tcp"].ok and not checks["ssh login"].ok
    assert "wrong key?" in checks["ssh login"].fix
    assert "rpc" not in checks and checks["toolchain"].ok


@needs_bare_python
def test_doctor_suggests_install_for_a_bare_python(tmp_path: Path, sshd: Sshd) -> None:
    from hostkit.fleet.doctor import diagnose

    device = _device(tmp_path, sshd, python=DEBIAN_PYTHON)
    checks = {c.name: c for c in diagnose(device)}
    assert checks["remote python"].ok and not checks["devicekit"].ok
    assert "edgekit device install --device sshbox" in checks["devicekit"].fix
    assert "rpc" not in checks


def test_doctor_rpc_device_and_cross_toolchain(daemon: Any) -> None:
    from hostkit.fleet.doctor import diagnose

    device = Device(name="dev", target={"kind": "llvm"}, host="127.0.0.1", port=daemon.port)
    checks = diagnose(device)
    assert [c.name for c in checks] == ["address", "tcp", "rpc", "tvm version", "target",
                                        "toolchain"]
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]

    gone = Device(name="gone", host="127.0.0.1", port=free_port(),
                  target={"kind": "llvm", "mtriple": "aarch64-linux-gnu"},
                  cross_compiler="aarch64-linux-gnu-gcc")
    checks = diagnose(gone)
    by_name = {c.name: c for c in checks}
    assert not by_name["tcp"].ok and "edgekit-device serve" in by_name["tcp"].fix
    if shutil.which("aarch64-linux-gnu-gcc"):
        assert by_name["toolchain"].ok and "aarch64-linux-gnu" in by_name["toolchain"].detail


def test_profile_over_ssh(tmp_path: Path, sshd: Sshd, capsys: pytest.CaptureFixture[str]) -> None:
    """Kernel times come from the board's daemon through the SSH tunnel, like any other call."""
    from hostkit.cli import main

    inventory = write_inventory(tmp_path / "inventory.yaml", sshd, python=sys.executable)
    code = main(["profile", "--device", "sshbox", "tinycnn", "--inventory", str(inventory),
                 "--json", "--runs", "3", "--repeat", "3"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["status"] == "ok", result.get("error")
    names = [row["name"] for row in result["profile"]["rows"]]
    assert any(name.startswith("conv2d 3x3 3->16 @32x32") for name in names), names
    assert result["memory"]["peak_rss_mb"] >= result["memory"]["idle_rss_mb"]


def test_deploy_over_ssh_without_sftp(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A board whose sshd has no SFTP subsystem (dropbear images): the artifact goes through
    `cat` on an exec channel, checked by its sha256 on the board like an SFTP copy."""
    from hostkit.cli import main

    server = start_sshd(tmp_path / "sshd", sftp=False)
    try:
        with SshConnection(_device(tmp_path, server)).connect() as conn:
            assert not conn.has_sftp
        inv = write_inventory(tmp_path / "inventory.yaml", server, python=sys.executable)
        assert main(["deploy", "-i", str(inv), "-d", "sshbox", "tinycnn", "--repeat", "3",
                     "--input-shape", "1,3,44,44", "--json"]) == 0, capsys.readouterr().err
        result = json.loads(capsys.readouterr().out)
        assert result["status"] == "ok" and result["uploaded"] is True
        store = tmp_path / "board" / "artifacts"
        assert (store / f"{result['artifact_sha256']}.so").is_file()
        assert not list(store.glob(".*.part")), "no staging file is left behind"
    finally:
        server.stop()


def test_ssh_device_at_a_port_that_is_not_ssh(tmp_path: Path, daemon: Any) -> None:
    """An RPC daemon's port given as ssh.port: one line saying it is not SSH, fast."""
    device = Device(name="wrong", target={"kind": "llvm"}, transport="ssh", host="127.0.0.1",
                    connect_timeout=5.0,
                    ssh=SshSettings(port=daemon.port, known_hosts=str(tmp_path / "kh")))
    start = time.monotonic()
    with pytest.raises(ConnectError) as caught:
        SshConnection(device).connect()
    assert caught.value.stage == "ssh"
    assert caught.value.message.startswith(
        f"what answers at 127.0.0.1:{daemon.port} does not speak SSH")
    assert time.monotonic() - start <= 10
