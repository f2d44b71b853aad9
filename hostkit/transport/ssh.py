"""The ssh transport: TVM RPC tunnelled over SSH to a daemon that listens on the board's loopback.

The board's daemon never listens on a network address: edgekit starts it (if nothing answers) bound
to the board's 127.0.0.1, and forwards a port on the host's 127.0.0.1 to it through the SSH
connection, like `ssh -L`. Host keys are checked against known_hosts; artifacts travel by SFTP and
are renamed into the board's store only once their sha256 matches.
"""

from __future__ import annotations

import json
import os
import select
import shlex
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hostkit.errors import ConnectError, RemoteError, TransferError
from hostkit.inventory import Device
from hostkit.transport.base import Progress, Transport, _first_line, connect_rpc

if TYPE_CHECKING:
    import paramiko
    from tvm.rpc import RPCSession

__all__ = ["SshTransport", "SshConnection", "LocalForward", "RemoteResult", "RemotePython",
           "probe_python", "remote_python_path", "check_devicekit", "host_tvm_version",
           "DAEMON_START_TIMEOUT_S"]

DAEMON_START_TIMEOUT_S = 60.0
DAEMON_STOP_TIMEOUT_S = 10.0
INSTALL_HINT = "run `edgekit device install --device {name}`"

# Runs on the board with the chosen python: what it is, and whether devicekit and TVM import.
_PROBE = """
import json, platform, sys
r = {"executable": sys.executable, "python": platform.python_version(),
     "arch": platform.machine(), "libc": " ".join(platform.libc_ver())}
for mod in ("devicekit", "tvm"):
    try:
        r[mod] = __import__(mod).__version__
    except Exception as exc:
        r[mod + "_error"] = (type(exc).__name__ + ": " + str(exc)).splitlines()[0][:200]
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


def host_tvm_version() -> str:
    import tvm

    return str(tvm.__version__)


@dataclass(frozen=True)
class RemoteResult:
    """A finished remote command: what ran, its exit code and its output."""

    command: str
    code: int
    stdout: str
    stderr: str

    def tail(self, lines: int = 3) -> str:
        text = (self.stderr.strip() or self.stdout.strip()).splitlines()
        return " | ".join(line.strip() for line in text[-lines:])


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


class _AcceptNew:
    """Host key policy `accept-new`: trust a host seen for the first time and save its key."""

    def __init__(self, known_hosts: Path) -> None:
        self.known_hosts = known_hosts

    def missing_host_key(self, client: "paramiko.SSHClient", hostname: str,
                         key: "paramiko.PKey") -> None:
        client.get_host_keys().add(hostname, key.get_name(), key)
        self.known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(self.known_hosts, "a", encoding="utf-8") as handle:
            handle.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")


class SshConnection:
    """One authenticated SSH connection to a board: run commands, use SFTP, open channels."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.ssh = device.ssh
        self.user = self.ssh.user or _local_user()
        self.target = f"{self.user}@{device.host}:{self.ssh.port}"
        self.client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._work_dir: str | None = None

    @property
    def known_hosts(self) -> Path:
        return Path(os.path.expanduser(self.ssh.known_hosts or "~/.ssh/known_hosts"))

    def connect(self) -> "SshConnection":
        import paramiko

        client = paramiko.SSHClient()
        if self.known_hosts.is_file():
            client.load_host_keys(str(self.known_hosts))
        if self.ssh.host_key_policy == "accept-new":
            client.set_missing_host_key_policy(_AcceptNew(self.known_hosts))  # type: ignore[arg-type]
        else:
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
        key_file = os.path.expanduser(self.ssh.key_file) if self.ssh.key_file else None
        timeout = self.device.connect_timeout
        try:
            # With key_file, only that key is offered; without it, the agent and ~/.ssh/id_*.
            client.connect(self.device.host, port=self.ssh.port, username=self.user,
                           key_filename=key_file, allow_agent=key_file is None,
                           look_for_keys=key_file is None, timeout=timeout,
                           banner_timeout=timeout, auth_timeout=timeout)
        except Exception as exc:
            client.close()
            raise self._connect_error(exc) from exc
        self.client = client
        return self

    def _connect_error(self, exc: Exception) -> ConnectError:
        import paramiko

        host, port = self.device.host, self.ssh.port
        name = self.device.name
        if isinstance(exc, paramiko.BadHostKeyException):
            entry = host if port == 22 else f"[{host}]:{port}"
            return ConnectError(
                f"host key of {host}:{port} does not match {self.known_hosts}: the board was "
                "reinstalled or someone is in between", device=name, stage="ssh",
                hint=f"if you trust the new key, remove the old one with "
                     f"`ssh-keygen -R '{entry}' -f {self.known_hosts}`")
        if isinstance(exc, paramiko.PasswordRequiredException):
            return ConnectError(f"ssh key {self.ssh.key_file} is encrypted", device=name,
                                stage="ssh", hint="load it into ssh-agent with `ssh-add` and "
                                                  "remove ssh.key_file from the inventory")
        if isinstance(exc, paramiko.AuthenticationException):
            used = f"key {self.ssh.key_file}" if self.ssh.key_file else "ssh-agent and ~/.ssh keys"
            return ConnectError(f"ssh login as {self.target} refused with {used}", device=name,
                                stage="ssh", hint="wrong key? check ssh.key_file and ssh.user, "
                                                  "and the board's ~/.ssh/authorized_keys")
        if isinstance(exc, paramiko.SSHException) and "not found in known_hosts" in str(exc):
            trust = f"ssh-keyscan -p {port} {host} >> {self.known_hosts}"
            return ConnectError(f"host key of {host}:{port} is unknown (not in {self.known_hosts})",
                                device=name, stage="ssh",
                                hint=f"check it, then trust it with `{trust}` or set "
                                     "ssh.host_key_policy: accept-new")
        if isinstance(exc, socket.gaierror):
            return ConnectError(f"cannot resolve host '{host}': {exc.strerror}", device=name,
                                stage="ssh", hint="check the device's host in the inventory")
        if isinstance(exc, (socket.timeout, TimeoutError)):
            return ConnectError(f"ssh to {self.target} timed out after "
                                f"{self.device.connect_timeout:.0f}s", device=name, stage="ssh",
                                hint="is the board on and reachable?")
        if isinstance(exc, (paramiko.ssh_exception.NoValidConnectionsError,
                            ConnectionRefusedError)):
            return ConnectError(f"nothing accepts ssh at {host}:{port}", device=name, stage="ssh",
                                hint="is sshd running on the board, and is ssh.port right?")
        return ConnectError(f"ssh to {self.target} failed: {_first_line(exc)}", device=name,
                            stage="ssh")

    @property
    def transport(self) -> "paramiko.Transport":
        if self.client is None or self.client.get_transport() is None:
            raise ConnectError(f"ssh connection to {self.target} is closed",
                               device=self.device.name, stage="ssh")
        transport = self.client.get_transport()
        assert transport is not None
        return transport

    def run(self, command: str, timeout: float | None = None) -> RemoteResult:
        """Run a shell command on the board and wait for it; a broken connection is ConnectError."""
        import paramiko

        assert self.client is not None, "connect() first"
        try:
            _, stdout, stderr = self.client.exec_command(command, timeout=timeout)
            out = stdout.read().decode(errors="replace")
            err = stderr.read().decode(errors="replace")
            code = stdout.channel.recv_exit_status()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise ConnectError(f"ssh to {self.target} broke while running `{command[:60]}`: "
                               f"{_first_line(exc)}", device=self.device.name,
                               stage="ssh") from exc
        return RemoteResult(command, code, out, err)

    def check(self, command: str, stage: str, timeout: float | None = None,
              hint: str | None = None) -> RemoteResult:
        """Run a command that must succeed; else RemoteError with its exit code and last lines."""
        result = self.run(command, timeout)
        if result.code != 0:
            raise RemoteError(f"`{_short(command)}` exited with code {result.code}: "
                              f"{result.tail()}", device=self.device.name, stage=stage, hint=hint)
        return result

    def sftp(self) -> "paramiko.SFTPClient":
        if self._sftp is None:
            assert self.client is not None, "connect() first"
            self._sftp = self.client.open_sftp()
        return self._sftp

    def exists(self, path: str) -> bool:
        try:
            self.sftp().stat(path)
            return True
        except OSError:
            return False

    @property
    def work_dir(self) -> str:
        """ssh.work_dir as an absolute path on the board (`~` is the login's home there)."""
        if self._work_dir is None:
            work = self.ssh.work_dir.rstrip("/") or "/"
            if work == "~" or work.startswith("~/"):
                home = self.sftp().normalize(".")
                work = home.rstrip("/") + work[1:]
            self._work_dir = work
        return self._work_dir

    def port_answers(self, port: int) -> bool:
        """True when something accepts connections on the board's 127.0.0.1:port."""
        import paramiko

        try:
            channel = self.transport.open_channel("direct-tcpip", ("127.0.0.1", port),
                                                  ("127.0.0.1", 0), timeout=10)
        except (paramiko.ChannelException, paramiko.SSHException, OSError):
            return False
        channel.close()
        return True

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
            self._sftp = None
        if self.client is not None:
            self.client.close()
            self.client = None

    def __enter__(self) -> "SshConnection":
        return self.connect()

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def remote_python_path(conn: SshConnection) -> str:
    """The python edgekit uses on the board: the venv `edgekit device install` made, or ssh.python."""
    venv_python = f"{conn.work_dir}/venv/bin/python"
    return venv_python if conn.exists(venv_python) else conn.ssh.python


def probe_python(conn: SshConnection, python: str) -> RemotePython:
    """Ask a python on the board what it is and whether devicekit and TVM import there."""
    result = conn.run(f"{shlex.quote(python)} -c {shlex.quote(_PROBE)}", timeout=120)
    if result.code != 0:
        missing = result.code == 127 or "not found" in result.stderr
        error = f"{python} not found on the board" if missing else result.tail()
        return RemotePython(path=python, error=error)
    try:
        data = json.loads(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return RemotePython(path=python, error=f"unexpected output: {result.stdout[-200:]}")
    missing_pkg = data.get("devicekit_error") or data.get("tvm_error") or ""
    return RemotePython(path=python, executable=data["executable"], python=data["python"],
                        arch=data["arch"], libc=data["libc"], devicekit=data.get("devicekit"),
                        tvm=data.get("tvm"), error=missing_pkg)


def check_devicekit(device: Device, remote: RemotePython, host_tvm: str) -> None:
    """ConnectError unless the board's python has devicekit and the host's TVM version."""
    hint = INSTALL_HINT.format(name=device.name)
    if not remote.executable:
        raise ConnectError(f"remote python {remote.path}: {remote.error}", device=device.name,
                           stage="python", hint=f"set ssh.python, or {hint}")
    if remote.devicekit is None or remote.tvm is None:
        raise ConnectError(f"{remote.path} on the board cannot import devicekit and TVM "
                           f"({remote.error})", device=device.name, stage="python", hint=hint)
    if remote.tvm != host_tvm:
        raise ConnectError(f"the board has TVM {remote.tvm} but this host has {host_tvm}; they "
                           "must match", device=device.name, stage="python", hint=hint)


class LocalForward:
    """`ssh -L`: a listener on the host's loopback, each connection forwarded to the board.

    Every accepted connection gets its own `direct-tcpip` channel to remote_host:remote_port as
    seen from the board, and a thread that copies bytes both ways until either side closes.
    """

    def __init__(self, transport: "paramiko.Transport", remote_port: int,
                 remote_host: str = "127.0.0.1", bind: str = "127.0.0.1") -> None:
        self._transport = transport
        self.remote = (remote_host, remote_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind((bind, 0))
        self._listener.listen(16)
        self.port: int = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._links: set[tuple[socket.socket, Any]] = set()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True,
                                          name=f"edgekit-forward-{self.port}")
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            ready, _, _ = select.select([self._listener], [], [], 0.2)
            if not ready or self._closed.is_set():
                continue
            try:
                sock, peer = self._listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._pipe, args=(sock, peer), daemon=True)
            with self._lock:
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def _pipe(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        try:
            channel = self._transport.open_channel("direct-tcpip", self.remote, peer, timeout=10)
        except Exception:  # the board refused (nothing listens) or the connection is gone
            sock.close()
            return
        link = (sock, channel)
        with self._lock:
            self._links.add(link)
        try:
            while not self._closed.is_set():
                ready, _, _ = select.select([sock, channel], [], [], 0.5)
                if sock in ready:
                    data = sock.recv(1 << 16)
                    if not data:
                        break
                    channel.sendall(data)
                if channel in ready:
                    data = channel.recv(1 << 16)
                    if not data:
                        break
                    sock.sendall(data)
        except OSError:
            pass  # either end went away; both are closed below
        finally:
            with self._lock:
                self._links.discard(link)
            channel.close()
            sock.close()

    def close(self) -> None:
        """Stop listening, cut every forwarded connection and wait for the threads to end."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._acceptor.join(timeout=5)
        self._listener.close()
        with self._lock:
            links, threads = list(self._links), list(self._threads)
        for sock, channel in links:
            channel.close()
            sock.close()
        for thread in threads:
            thread.join(timeout=5)

    def __enter__(self) -> "LocalForward":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class SshTransport(Transport):
    """RPC through an SSH tunnel; starts the board's daemon (on its loopback) when none answers."""

    def __init__(self, device: Device) -> None:
        super().__init__(device)
        self.conn: SshConnection | None = None
        self.forward: LocalForward | None = None
        self.python: str = device.ssh.python
        self.daemon_pid: int | None = None  # set only when this transport started the daemon
        self._store: str = ""

    def open(self) -> None:
        conn = SshConnection(self.device).connect()
        self.conn = conn
        try:
            remote = probe_python(conn, remote_python_path(conn))
            check_devicekit(self.device, remote, host_tvm_version())
            self.python = remote.path
            self._store = f"{conn.work_dir}/artifacts"
            if not conn.port_answers(self.device.ssh.rpc_port):
                self._start_daemon(conn)
            self.forward = LocalForward(conn.transport, self.device.ssh.rpc_port)
        except BaseException:
            self.close()
            raise

    def _start_daemon(self, conn: SshConnection) -> None:
        port = self.device.ssh.rpc_port
        work = shlex.quote(conn.work_dir)
        base = f"{conn.work_dir}/daemon-{port}"
        port_file, log = f"{base}.port", f"{base}.log"
        serve = (f"nohup {shlex.quote(self.python)} -m devicekit serve --listen 127.0.0.1 "
                 f"--port {port} --store {shlex.quote(self._store)} "
                 f"--port-file {shlex.quote(port_file)}")
        command = (f"mkdir -p {shlex.quote(self._store)} && cd {work} && "
                   f"rm -f {shlex.quote(port_file)} && "
                   f"{serve} >{shlex.quote(log)} 2>&1 </dev/null & echo $!")
        pid = int(conn.check(command, stage="start", timeout=30).stdout.split()[-1])
        conn.check(f"echo {pid} > {shlex.quote(base + '.pid')}", stage="start")
        deadline = time.monotonic() + DAEMON_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if conn.exists(port_file):
                self.daemon_pid = pid
                return
            if conn.run(f"kill -0 {pid}").code != 0:
                if conn.port_answers(port):  # another host started one at the same moment
                    return
                tail = conn.run(f"tail -n 3 {shlex.quote(log)}").stdout.strip()
                raise ConnectError(f"the board's daemon exited at start: "
                                   f"{' | '.join(tail.splitlines())}", device=self.device.name,
                                   stage="start", hint=f"see {log} on the board")
            time.sleep(0.2)
        conn.run(f"kill -9 {pid}")
        raise ConnectError(f"the board's daemon did not start within "
                           f"{DAEMON_START_TIMEOUT_S:.0f}s", device=self.device.name,
                           stage="start", hint=f"see {log} on the board")

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
        rpc_port = self.device.ssh.rpc_port
        where = f"{self.device.address} -> board 127.0.0.1:{rpc_port}"
        started = " (daemon started by edgekit)" if self.daemon_pid else ""
        local = f" via 127.0.0.1:{self.forward.port}" if self.forward else ""
        return f"{where}{local}{started}"

    def session(self) -> "RPCSession":
        if self.forward is None:
            raise ConnectError("the ssh transport is not open", device=self.device.name,
                               stage="connect")
        return connect_rpc(self.device, "127.0.0.1", self.forward.port,
                           hint=f"try `edgekit doctor --device {self.device.name}`")

    def put_artifact(self, sess: "RPCSession", path: Path, sha256: str,
                     progress: Progress | None = None) -> None:
        """SFTP the artifact to a hidden part file, verify its hash on the board, rename it in.

        If the daemon serves another store (one edgekit did not start), fall back to RPC upload.
        """
        conn = self.conn
        if conn is None:
            raise TransferError("the ssh transport is not open", device=self.device.name,
                                stage="upload")
        final = f"{self._store}/{sha256}{path.suffix}"
        part = f"{self._store}/.{sha256}.part"
        size = path.stat().st_size
        try:
            conn.check(f"mkdir -p {shlex.quote(self._store)}", stage="upload")
            conn.sftp().put(str(path), part, callback=progress, confirm=True)
        except BaseException as exc:
            self._discard(conn, part)
            if not isinstance(exc, Exception):
                raise
            raise TransferError(f"upload of {path.name} ({size} bytes) to {conn.target} broke: "
                                f"{_first_line(exc)}", device=self.device.name, stage="upload",
                                hint="the partial file was discarded; deploy again") from exc
        verify = conn.run(f"{shlex.quote(self.python)} -c {shlex.quote(_VERIFY)} "
                          f"{shlex.quote(part)} {shlex.quote(final)} {sha256}", timeout=300)
        if verify.code == 3:
            raise TransferError(f"upload of {path.name} corrupted: the board read sha256 "
                                f"{verify.stdout.strip()[:12]}, expected {sha256[:12]}",
                                device=self.device.name, stage="upload",
                                hint="it was discarded; deploy again to resend it")
        if verify.code != 0:
            self._discard(conn, part)
            raise TransferError(f"checking {path.name} on the board failed: {verify.tail()}",
                                device=self.device.name, stage="upload")
        if not sess.get_function("edgekit.artifact_has")(sha256):
            super().put_artifact(sess, path, sha256, progress)

    @staticmethod
    def _discard(conn: SshConnection, part: str) -> None:
        try:
            conn.sftp().remove(part)
        except Exception:  # noqa: S110 - the connection may be gone; the name is never loaded
            pass

    def close(self) -> None:
        if self.forward is not None:
            self.forward.close()
            self.forward = None
        conn, self.conn = self.conn, None
        if conn is None:
            return
        try:
            if self.daemon_pid is not None and conn.client is not None:
                self._stop_daemon(conn, self.daemon_pid)
        except ConnectError:
            pass  # the connection is gone; the daemon's watchdog cannot help, but close must finish
        finally:
            self.daemon_pid = None
            conn.close()


def _local_user() -> str:
    import getpass

    return getpass.getuser()


def _short(command: str) -> str:
    return command if len(command) <= 80 else command[:77] + "..."
