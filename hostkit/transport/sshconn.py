"""One SSH connection to a board (paramiko): verified host key, commands, SFTP.

Host keys are checked against known_hosts (`strict`, the default) or trusted on first sight and
saved (`accept-new`). Every paramiko and socket error is mapped here to one ConnectError line that
names user@host:port and says what to do; no key material is ever printed.
"""

from __future__ import annotations

import os
import shlex
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, cast

from hostkit.errors import ConnectError, RemoteError, first_line
from hostkit.inventory import Device

if TYPE_CHECKING:
    import paramiko

__all__ = ["SshConnection", "RemoteResult", "known_hosts_name"]


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
    """One authenticated SSH connection to a board: run commands, use SFTP, open channels.

    `pinned_key` ("TYPE BASE64") trusts exactly that host key instead of known_hosts: the tunnel
    process uses the key its parent already verified.
    """

    def __init__(self, device: Device, pinned_key: str | None = None) -> None:
        self.device = device
        self.ssh = device.ssh
        self.user = self.ssh.user or _local_user()
        self.target = f"{self.user}@{device.host}:{self.ssh.port}"
        self.client: paramiko.SSHClient | None = None
        self._pinned_key = pinned_key
        self._sftp: paramiko.SFTPClient | None = None
        self._no_sftp: bool | None = None
        self._work_dir: str | None = None

    @property
    def known_hosts(self) -> Path:
        return Path(os.path.expanduser(self.ssh.known_hosts or "~/.ssh/known_hosts"))

    @property
    def host_key(self) -> str:
        key = self.transport.get_remote_server_key()
        return f"{key.get_name()} {key.get_base64()}"

    def connect(self) -> "SshConnection":
        import paramiko
        from paramiko.hostkeys import HostKeyEntry

        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        if self._pinned_key:
            entry = HostKeyEntry.from_line(f"{known_hosts_name(self.device)} {self._pinned_key}")
            assert entry is not None and entry.key is not None
            client.get_host_keys().add(entry.hostnames[0], entry.key.get_name(), entry.key)
        else:
            if self.known_hosts.is_file():
                client.load_host_keys(str(self.known_hosts))
            if self.ssh.host_key_policy == "accept-new":
                # paramiko takes any object with missing_host_key(); the cast says so to mypy.
                client.set_missing_host_key_policy(
                    cast("paramiko.MissingHostKeyPolicy", _AcceptNew(self.known_hosts)))
        key_file = os.path.expanduser(self.ssh.key_file) if self.ssh.key_file else None
        timeout = self.device.connect_timeout
        try:
            # With key_file only that key is offered; without it, the agent and ~/.ssh/id_*.
            client.connect(self.device.host, port=self.ssh.port, username=self.user,
                           key_filename=key_file, allow_agent=key_file is None,
                           look_for_keys=key_file is None, timeout=timeout,
                           banner_timeout=timeout, auth_timeout=timeout)
        except Exception as exc:
            client.close()
            raise self._connect_error(exc) from exc
        self.client = client
        self.transport.set_keepalive(30)
        return self

    def _connect_error(self, exc: Exception) -> ConnectError:
        import paramiko

        host, port, known = self.device.host, self.ssh.port, self.known_hosts

        def error(message: str, hint: str | None = None) -> ConnectError:
            return ConnectError(message, device=self.device.name, stage="ssh", hint=hint)

        if isinstance(exc, paramiko.BadHostKeyException):
            return error(f"host key of {host}:{port} does not match {known}: the board was "
                         "reinstalled, or someone is in between",
                         f"if you trust the new key, remove the old one with `ssh-keygen -R "
                         f"'{known_hosts_name(self.device)}' -f {known}`")
        if isinstance(exc, paramiko.PasswordRequiredException):
            return error(f"ssh key {self.ssh.key_file} is encrypted",
                         "load it into ssh-agent with `ssh-add` and drop ssh.key_file")
        if isinstance(exc, paramiko.AuthenticationException):
            used = f"key {self.ssh.key_file}" if self.ssh.key_file else "ssh-agent and ~/.ssh keys"
            return error(f"ssh login as {self.target} refused with {used}",
                         "wrong key? check ssh.key_file and ssh.user, and the board's "
                         "~/.ssh/authorized_keys")
        if isinstance(exc, paramiko.SSHException) and any(
                text in str(exc) for text in ("protocol banner", "No existing session")):
            return error(f"what answers at {host}:{port} does not speak SSH "
                         f"({first_line(exc)})", "is ssh.port the board's SSH port? the "
                         "daemon's own port is ssh.rpc_port, reached through the tunnel")
        if isinstance(exc, paramiko.SSHException) and "not found in known_hosts" in str(exc):
            return error(f"host key of {host}:{port} is unknown (not in {known})",
                         f"check it, then trust it with `ssh-keyscan -p {port} {host} >> "
                         f"{known}` or set ssh.host_key_policy: accept-new")
        if isinstance(exc, socket.gaierror):
            return error(f"cannot resolve host '{host}': {exc.strerror}",
                         "check the device's host in the inventory")
        if isinstance(exc, (socket.timeout, TimeoutError)):
            return error(f"ssh to {self.target} timed out after "
                         f"{self.device.connect_timeout:.0f}s", "is the board on and reachable?")
        if isinstance(exc, OSError):  # refused, unreachable (NoValidConnectionsError included)
            return error(f"cannot reach ssh at {host}:{port}: {first_line(exc)}",
                         "is sshd running on the board, and is ssh.port right?")
        return error(f"ssh to {self.target} failed: {first_line(exc)}")

    @property
    def transport(self) -> "paramiko.Transport":
        transport = self.client.get_transport() if self.client is not None else None
        if transport is None or not self.alive:
            raise ConnectError(f"ssh connection to {self.target} is closed",
                               device=self.device.name, stage="ssh")
        return transport

    @property
    def alive(self) -> bool:
        transport = self.client.get_transport() if self.client is not None else None
        return transport is not None and transport.is_active()

    def run(self, command: str, timeout: float | None = None) -> RemoteResult:
        """Run a shell command on the board and wait; a broken connection is a ConnectError."""
        import paramiko

        assert self.client is not None, "connect() first"
        try:
            _, stdout, stderr = self.client.exec_command(command, timeout=timeout)
            out = stdout.read().decode(errors="replace")
            err = stderr.read().decode(errors="replace")
            code = stdout.channel.recv_exit_status()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise ConnectError(f"ssh to {self.target} broke while running `{_short(command)}`: "
                               f"{first_line(exc)}", device=self.device.name,
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
        """The SFTP session; ConnectError (one line) when the board's sshd has no SFTP."""
        if self._sftp is None:
            import paramiko

            assert self.client is not None, "connect() first"
            try:
                self._sftp = self.client.open_sftp()
            except (paramiko.SSHException, EOFError, OSError) as exc:
                self._no_sftp = True
                raise ConnectError(f"ssh at {self.target} offers no SFTP subsystem "
                                   f"({first_line(exc)})", device=self.device.name, stage="ssh",
                                   hint="enable it in the board's sshd (dropbear needs "
                                        "sftp-server installed)") from exc
        return self._sftp

    @property
    def has_sftp(self) -> bool:
        """Whether SFTP works here (dropbear images often lack it); asked once."""
        if self._no_sftp is None:
            try:
                self.sftp()
                self._no_sftp = False
            except ConnectError:
                self._no_sftp = True
        return not self._no_sftp

    def put(self, local: str, remote: str,
            callback: Callable[[int, int], None] | None = None) -> None:
        """Copy a file to the board: by SFTP, or without it through `cat` on an exec channel.

        The caller checks the copy's sha256 on the board either way.
        """
        if self.has_sftp:
            self.sftp().put(local, remote, callback=callback, confirm=True)
            return
        total = os.path.getsize(local)
        channel = self.transport.open_session()
        try:
            channel.exec_command(f"cat > {shlex.quote(remote)}")
            done = 0
            with open(local, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 16), b""):
                    channel.sendall(block)
                    done += len(block)
                    if callback:
                        callback(done, total)
            channel.shutdown_write()
            code = channel.recv_exit_status()
            if code != 0:
                err = channel.recv_stderr(4096).decode(errors="replace").strip()
                raise OSError(f"`cat > {remote}` exited with code {code}: {err[-200:]}")
        finally:
            channel.close()

    def remove(self, path: str) -> None:
        if self.has_sftp:
            self.sftp().remove(path)
        else:
            self.run(f"rm -f {shlex.quote(path)}", timeout=30)

    def exists(self, path: str) -> bool:
        if not self.has_sftp:
            return self.run(f"test -e {shlex.quote(path)}", timeout=30).code == 0
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
                home = self.sftp().normalize(".") if self.has_sftp else \
                    self.run("cd && pwd", timeout=30).stdout.strip()
                work = home.rstrip("/") + work[1:]
            self._work_dir = work
        return self._work_dir

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


def known_hosts_name(device: Device) -> str:
    return device.host if device.ssh.port == 22 else f"[{device.host}]:{device.ssh.port}"


def _local_user() -> str:
    import getpass

    return getpass.getuser()


def _short(command: str) -> str:
    command = " ".join(command.split())
    return command if len(command) <= 80 else command[:77] + "..."
