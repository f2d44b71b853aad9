"""The ssh transport: TVM RPC tunnelled over SSH to a daemon that listens on the board's loopback.

The board's daemon never listens on a network address: edgekit starts it (if nothing answers) bound
to the board's 127.0.0.1 and forwards a port on the host's 127.0.0.1 to it, like `ssh -L`. Host
keys are checked against known_hosts; artifacts travel by SFTP (or, on boards without it, through
`cat` on an exec channel) and are renamed into the board's store only once their sha256 matches.

Pieces: `sshconn.SshConnection` (the verified, authenticated link), `tunnel.SshTunnel` (the port
forward, in a child process), and here the board-side checks and the transport itself.
"""

from __future__ import annotations

import json
import logging
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hostkit.errors import ConnectError, TransferError, first_line
from hostkit.inventory import Device
from hostkit.transport.base import Progress, Transport, connect_rpc, watch_of
from hostkit.transport.sshconn import SshConnection
from hostkit.transport.tunnel import SshTunnel

if TYPE_CHECKING:
    from tvm.rpc import RPCSession

__all__ = ["SshTransport", "RemotePython", "probe_python", "remote_python_path",
           "check_devicekit", "remote_port_open", "host_tvm_version"]

log = logging.getLogger("edgekit")

DAEMON_START_TIMEOUT_S = 60.0
DAEMON_STOP_TIMEOUT_S = 10.0
INSTALL_HINT = "run `edgekit device install --device {name}`"

# Runs on the board with the chosen python: what it is, and whether devicekit and TVM are there.
# TVM's version comes from its package metadata when it has some: importing TVM takes seconds.
_PROBE = """
import importlib.metadata, importlib.util, json, platform, sys
r = {"executable": sys.executable, "python": platform.python_version(),
     "arch": platform.machine(), "libc": " ".join(platform.libc_ver())}
try:
    r["devicekit"] = __import__("devicekit").__version__
except Exception as exc:
    r["devicekit_error"] = (type(exc).__name__ + ": " + str(exc)).splitlines()[0][:200]
try:
    if importlib.util.find_spec("tvm") is None:
        raise ImportError("No module named 'tvm'")
    try:
        r["tvm"] = importlib.metadata.version("apache-tvm")
    except importlib.metadata.PackageNotFoundError:
        r["tvm"] = __import__("tvm").__version__
except Exception as exc:
    r["tvm_error"] = (type(exc).__name__ + ": " + str(exc)).splitlines()[0][:200]
print(json.dumps(r))
"""

# Runs on the board: keep the uploaded part only if its sha256 is the announced one.
_VERIFY = """
import hashlib, os, sys
part, final, want = sys.argv[1:4]
h = hashlib.sha256()
with open(part, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
if h.hexdigest() != want:
    os.unlink(part)
    print(h.hexdigest())
    sys.exit(3)
os.replace(part, final)
"""

_PORT_OPEN = "import socket, sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 3)"


def host_tvm_version() -> str:
    """This host's TVM version, measured the way the board's is (see `_PROBE`)."""
    from importlib import metadata

    try:
        return metadata.version("apache-tvm")
    except metadata.PackageNotFoundError:  # TVM built from source
        import tvm

        return str(tvm.__version__)


@dataclass(frozen=True)
class RemotePython:
    """What a python on the board reports about itself and the packages edgekit needs."""

    path: str
    executable: str = ""
    python: str = ""
    arch: str = ""
    libc: str = ""
    devicekit: str | None = None
    tvm: str | None = None
    error: str = ""


def remote_python_path(conn: SshConnection) -> str:
    """The board's python for edgekit: the venv `edgekit device install` made, else ssh.python."""
    venv_python = f"{conn.work_dir}/venv/bin/python"
    return venv_python if conn.exists(venv_python) else conn.ssh.python


def probe_python(conn: SshConnection, python: str) -> RemotePython:
    """Ask a python on the board what it is and whether devicekit and TVM import there."""
    result = conn.run(f"{shlex.quote(python)} -c {shlex.quote(_PROBE)}", timeout=120)
    if result.code != 0:
        missing = result.code == 127 or "not found" in result.stderr
        return RemotePython(path=python, error="not found" if missing else result.tail())
    try:
        data = json.loads(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return RemotePython(path=python, error=f"unexpected output: {result.stdout[-200:]!r}")
    return RemotePython(path=python, executable=data["executable"], python=data["python"],
                        arch=data["arch"], libc=data["libc"], devicekit=data.get("devicekit"),
                        tvm=data.get("tvm"),
                        error=data.get("devicekit_error") or data.get("tvm_error") or "")


def check_devicekit(device: Device, remote: RemotePython, host_tvm: str) -> None:
    """ConnectError unless the board's python has devicekit and the host's TVM version."""
    hint = INSTALL_HINT.format(name=device.name)
    if not remote.executable:
        raise ConnectError(f"python {remote.path} on the board: {remote.error}",
                           device=device.name, stage="python", hint=f"set ssh.python, or {hint}")
    if remote.devicekit is None or remote.tvm is None:
        raise ConnectError(f"{remote.path} on the board cannot import devicekit and TVM "
                           f"({remote.error})", device=device.name, stage="python", hint=hint)
    if remote.tvm != host_tvm:
        raise ConnectError(f"the board has TVM {remote.tvm} but this host has {host_tvm}; they "
                           "must match", device=device.name, stage="python", hint=hint)


def remote_port_open(conn: SshConnection, python: str, port: int) -> bool:
    """True when something accepts connections on the board's 127.0.0.1:port."""
    command = f"{shlex.quote(python)} -c {shlex.quote(_PORT_OPEN)} {port}"
    return conn.run(command, timeout=30).code == 0


class SshTransport(Transport):
    """RPC through an SSH tunnel; starts the board's daemon (on its loopback) when none answers."""

    def __init__(self, device: Device) -> None:
        super().__init__(device)
        self.conn: SshConnection | None = None
        self.tunnel: SshTunnel | None = None
        self.python: str = device.ssh.python
        self.daemon_pid: int | None = None  # set only when this transport started the daemon
        self.store_dir: str = ""

    def open(self) -> None:
        conn = SshConnection(self.device).connect()
        self.conn = conn
        try:
            remote = probe_python(conn, remote_python_path(conn))
            check_devicekit(self.device, remote, host_tvm_version())
            self.python = remote.path
            self.store_dir = f"{conn.work_dir}/artifacts"
            if not remote_port_open(conn, self.python, self.device.ssh.rpc_port):
                self._start_daemon(conn)
            self.tunnel = SshTunnel(conn, self.device.ssh.rpc_port)
        except BaseException:
            self.close()
            raise

    def _start_daemon(self, conn: SshConnection) -> None:
        port = self.device.ssh.rpc_port
        base = f"{conn.work_dir}/daemon-{port}"
        port_file, logfile = shlex.quote(f"{base}.port"), f"{base}.log"
        serve = (f"nohup {shlex.quote(self.python)} -m devicekit serve --listen 127.0.0.1 "
                 f"--port {port} --store {shlex.quote(self.store_dir)} --port-file {port_file}")
        # The braces background the daemon alone, so `$!` is its pid (nohup execs python).
        command = (f"mkdir -p {shlex.quote(self.store_dir)} && cd {shlex.quote(conn.work_dir)} "
                   f"&& rm -f {port_file} && {{ {serve} >{shlex.quote(logfile)} 2>&1 </dev/null "
                   f"& echo $! | tee {shlex.quote(base + '.pid')}; }}")
        pid = int(conn.check(command, stage="start", timeout=30).stdout.split()[-1])
        deadline = time.monotonic() + DAEMON_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if conn.exists(f"{base}.port"):
                self.daemon_pid = pid
                return
            if conn.run(f"kill -0 {pid}").code != 0:
                if remote_port_open(conn, self.python, port):
                    return  # another host started one at the same moment: use that one
                tail = conn.run(f"tail -n 3 {shlex.quote(logfile)}").stdout.strip()
                raise ConnectError(f"the board's daemon exited at start: "
                                   f"{' | '.join(tail.splitlines())}", device=self.device.name,
                                   stage="start", hint=f"see {logfile} on the board")
            time.sleep(0.2)
        conn.run(f"kill -KILL {pid}")
        raise ConnectError(f"the board's daemon did not start within "
                           f"{DAEMON_START_TIMEOUT_S:.0f}s", device=self.device.name,
                           stage="start", hint=f"see {logfile} on the board")

    def _stop_daemon(self, conn: SshConnection, pid: int) -> None:
        conn.run(f"kill -TERM {pid}")
        deadline = time.monotonic() + DAEMON_STOP_TIMEOUT_S
        while conn.run(f"kill -0 {pid}").code == 0:
            if time.monotonic() > deadline:
                conn.run(f"kill -KILL {pid}")
                break
            time.sleep(0.2)
        conn.run(f"rm -f {shlex.quote(conn.work_dir)}/daemon-{self.device.ssh.rpc_port}.pid")

    @property
    def address(self) -> str:
        where = f"{self.device.address} -> board 127.0.0.1:{self.device.ssh.rpc_port}"
        local = f" via 127.0.0.1:{self.tunnel.port}" if self.tunnel else ""
        started = " (daemon started by edgekit)" if self.daemon_pid else ""
        return f"{where}{local}{started}"

    def session(self) -> "RPCSession":
        if self.tunnel is None:
            raise ConnectError("the ssh transport is not open", device=self.device.name,
                               stage="connect")
        return connect_rpc(self.device, "127.0.0.1", self.tunnel.port,
                           hint=f"try `edgekit doctor --device {self.device.name}`",
                           notify=self.notify, log_tail=self.log_tail)

    def log_tail(self) -> str:
        """The last lines of the board's daemon log, when this transport started the daemon."""
        conn = self.conn
        if self.daemon_pid is None or conn is None or not conn.alive:
            return ""
        log_file = f"{conn.work_dir}/daemon-{self.device.ssh.rpc_port}.log"
        try:
            tail = conn.run(f"tail -n 3 {shlex.quote(log_file)}", timeout=10).stdout
        except ConnectError:
            return ""
        return " | ".join(line.strip() for line in tail.splitlines() if line.strip())

    def put_artifact(self, sess: "RPCSession", path: Path, sha256: str,
                     progress: Progress | None = None) -> None:
        """SFTP the artifact to a hidden part file, verify its hash on the board, rename it in.

        A daemon edgekit did not start may serve another store; then the RPC upload is used.
        """
        conn = self.conn
        if conn is None:
            raise TransferError("the ssh transport is not open", device=self.device.name,
                                stage="upload")
        final = f"{self.store_dir}/{sha256}{path.suffix}"
        part = f"{self.store_dir}/.{sha256}.part"
        size = path.stat().st_size
        watch = watch_of(sess)

        def sent(done: int, total: int) -> None:
            # The copy bypasses the RPC relay: tell the session's watchdog it is moving.
            if watch is not None:
                watch.progress()
            if progress is not None:
                progress(done, total)

        try:
            conn.check(f"mkdir -p {shlex.quote(self.store_dir)}", stage="upload")
            conn.put(str(path), part, callback=sent)
        except BaseException as exc:
            _discard(conn, part)
            if not isinstance(exc, Exception):
                raise
            raise TransferError(f"upload of {path.name} ({size} bytes) to {conn.target} broke: "
                                f"{first_line(exc)}", device=self.device.name, stage="upload",
                                hint="the partial file was discarded; deploy again") from exc
        verify = conn.run(f"{shlex.quote(self.python)} -c {shlex.quote(_VERIFY)} "
                          f"{shlex.quote(part)} {shlex.quote(final)} {sha256}", timeout=300)
        if verify.code == 3:
            raise TransferError(f"upload of {path.name} corrupted: the board read sha256 "
                                f"{verify.stdout.strip()[:12]}, expected {sha256[:12]}",
                                device=self.device.name, stage="upload",
                                hint="it was discarded; deploy again to resend it")
        if verify.code != 0:
            _discard(conn, part)
            raise TransferError(f"checking {path.name} on the board failed: {verify.tail()}",
                                device=self.device.name, stage="upload")
        if not sess.get_function("edgekit.artifact_has")(sha256):
            super().put_artifact(sess, path, sha256, progress)

    def close(self) -> None:
        if self.tunnel is not None:
            self.tunnel.close()
            self.tunnel = None
        conn, self.conn = self.conn, None
        pid, self.daemon_pid = self.daemon_pid, None
        try:
            if pid is not None:
                if conn is None or not conn.alive:  # the link broke: one fresh try to clean up
                    conn = SshConnection(self.device).connect()
                self._stop_daemon(conn, pid)
        except ConnectError as exc:
            log.warning("%s: could not stop the board's daemon (pid %s): %s", self.device.name,
                        pid, exc)
        finally:
            if conn is not None:
                conn.close()


def _discard(conn: SshConnection, part: str) -> None:
    try:
        conn.remove(part)
    except Exception:  # noqa: S110 - the connection may be gone; a part file is never loaded
        pass
