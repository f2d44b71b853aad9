"""`ssh -L` in a child process: a loopback listener whose connections go to the board.

The forwarding runs in its own process (`SshTunnel`), not in a thread of the caller: TVM's RPC
client holds the GIL while it waits for a reply (when it frees a remote object), so a forwarder
thread in the same interpreter could never deliver that reply and the session would hang.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import subprocess
import sys
import threading
from typing import IO, TYPE_CHECKING, Any

from hostkit.errors import ConnectError
from hostkit.inventory import Device, SshSettings
from hostkit.transport.sshconn import SshConnection

if TYPE_CHECKING:
    import paramiko

__all__ = ["LocalForward", "SshTunnel"]


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
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            ready, _, _ = select.select([self._listener], [], [], 0.2)
            if not ready or self._closed.is_set():
                continue
            sock, peer = self._listener.accept()
            thread = threading.Thread(target=self._pipe, args=(sock, peer), daemon=True)
            with self._lock:
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def _pipe(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        try:
            channel = self._transport.open_channel("direct-tcpip", self.remote, peer, timeout=10)
        except Exception:  # nothing listens on the board, or the connection is gone
            sock.close()
            return
        link = (sock, channel)
        with self._lock:
            self._links.add(link)
        try:
            while not self._closed.is_set():
                ready, _, _ = select.select([sock, channel], [], [], 0.5)  # type: ignore[type-var]
                for source, sink in ((sock, channel), (channel, sock)):
                    if source in ready:
                        data = source.recv(1 << 16)
                        if not data:
                            return
                        sink.sendall(data)
        except (OSError, ValueError):
            pass  # either end went away, or close() shut them
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


class SshTunnel:
    """A `LocalForward` in a child process with its own SSH connection; a context manager.

    The child trusts only the host key the parent verified, prints the port it listens on, and
    exits when its stdin closes: on `close()`, or when this process dies.
    """

    def __init__(self, conn: SshConnection, remote_port: int) -> None:
        device = conn.device
        request = {"name": device.name, "host": device.host,
                   "connect_timeout": device.connect_timeout, "ssh": vars(device.ssh),
                   "host_key": conn.host_key, "remote_port": remote_port}
        code = "from hostkit.transport.tunnel import _tunnel_main; _tunnel_main()"
        self._proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps(request).encode() + b"\n")
        self._proc.stdin.flush()
        try:
            answer = json.loads(_readline(self._proc.stdout, device.connect_timeout + 30) or "{}")
        except ValueError:
            answer = {}
        if "port" not in answer:
            self.close()
            problem = answer.get("error") or f"it exited with code {self._proc.returncode}"
            raise ConnectError(f"the ssh tunnel did not start: {problem}", device=device.name,
                               stage="tunnel")
        self.port: int = int(answer["port"])
        self.pid = self._proc.pid

    def close(self) -> None:
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def __enter__(self) -> "SshTunnel":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _readline(stream: IO[bytes], timeout: float) -> bytes:
    ready, _, _ = select.select([stream], [], [], timeout)
    return stream.readline() if ready else b""


def _tunnel_main() -> None:
    """The tunnel process: connect, forward, report the port, run until stdin closes."""
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    request = json.loads(sys.stdin.readline())
    device = Device(name=request["name"], target="", host=request["host"],
                    connect_timeout=request["connect_timeout"],
                    ssh=SshSettings(**request["ssh"]))
    try:
        conn = SshConnection(device, pinned_key=request["host_key"]).connect()
        forward = LocalForward(conn.transport, request["remote_port"])
    except Exception as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        return
    print(json.dumps({"port": forward.port}), flush=True)
    sys.stdin.read()
    forward.close()
    conn.close()
