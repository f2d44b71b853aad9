"""A real OpenSSH server on 127.0.0.1 for integration tests, with keys made for the occasion.

`start_sshd(root)` writes a host key, an authorized user key, a second key the server does not
know, a known_hosts file that trusts the host key, and an sshd_config that points at all of them,
then runs `/usr/sbin/sshd -D -e -f <config>` on a free loopback port. Nothing touches ~/.ssh.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Sshd", "start_sshd", "free_port", "write_inventory", "SSHD", "sshd_missing"]

SSHD = "/usr/sbin/sshd"


def sshd_missing() -> str | None:
    """Why the sshd tests cannot run here, or None."""
    if not os.path.exists(SSHD):
        return f"{SSHD} not found (apt-get install openssh-server)"
    if shutil.which("ssh-keygen") is None:
        return "ssh-keygen not found (apt-get install openssh-client)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """Runs in the sshd child before exec: SIGTERM it when pytest dies, so no server outlives it."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _keygen(path: Path, comment: str) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL)
    return path.with_suffix(".pub").read_text(encoding="utf-8").strip()


@dataclass
class Sshd:
    root: Path
    port: int
    user: str
    user_key: Path
    stranger_key: Path
    known_hosts: Path
    host_pub: str
    proc: subprocess.Popen[bytes]
    log: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def known_hosts_line(self) -> str:
        return f"[127.0.0.1]:{self.port} {' '.join(self.host_pub.split()[:2])}\n"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_sshd(root: Path, attempts: int = 3, sftp: bool = True) -> Sshd:
    """Start sshd on a free 127.0.0.1 port; it lives until `stop()`. `sftp=False` leaves out
    the SFTP subsystem, as many dropbear images do."""
    root.mkdir(parents=True, exist_ok=True)
    host_pub = _keygen(root / "host_ed25519", "edgekit-test-host")
    user_pub = _keygen(root / "user_ed25519", "edgekit-test-user")
    _keygen(root / "stranger_ed25519", "edgekit-test-stranger")
    (root / "authorized_keys").write_text(user_pub + "\n", encoding="utf-8")
    # sshd refuses to start without its privilege separation directory (created by its service).
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    log = root / "sshd.log"
    last_error = ""
    for _ in range(attempts):
        port = free_port()
        config = root / "sshd_config"
        config.write_text("\n".join([
            f"Port {port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {root / 'host_ed25519'}",
            f"AuthorizedKeysFile {root / 'authorized_keys'}",
            f"PidFile {root / 'sshd.pid'}",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "AllowTcpForwarding local",
            "X11Forwarding no",
            "Subsystem sftp internal-sftp" if sftp else "",
            "LogLevel VERBOSE",
            "",
        ]), encoding="utf-8")
        with open(log, "ab") as log_handle:
            proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                                    stdout=log_handle, stderr=log_handle,
                                    preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    if sock.recv(4) == b"SSH-":
                        break
            except OSError:
                time.sleep(0.05)
        if proc.poll() is None:
            known_hosts = root / "known_hosts"
            sshd = Sshd(root=root, port=port, user=getpass.getuser(),
                        user_key=root / "user_ed25519", stranger_key=root / "stranger_ed25519",
                        known_hosts=known_hosts, host_pub=host_pub, proc=proc, log=log)
            known_hosts.write_text(sshd.known_hosts_line(), encoding="utf-8")
            return sshd
        last_error = log.read_text(encoding="utf-8", errors="replace")[-500:]
    raise RuntimeError(f"sshd did not start: {last_error}")


def write_inventory(path: Path, sshd: Sshd, name: str = "sshbox", **ssh: Any) -> Path:
    """An inventory with one `transport: ssh` device reaching this sshd; `ssh` overrides keys."""
    settings: dict[str, Any] = {
        "port": sshd.port,
        "user": sshd.user,
        "key_file": str(sshd.user_key),
        "known_hosts": str(sshd.known_hosts),
        "work_dir": str(path.parent / "board"),
        "rpc_port": free_port(),
    }
    settings.update(ssh)
    data = {"devices": {name: {"target": {"kind": "llvm"}, "transport": "ssh",
                               "host": "127.0.0.1", "connect_timeout": 10, "ssh": settings}}}
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path
