"""The relay's own process: forwards one RPC connection and cuts it when the device stalls.

Runs as `python -S relay_process.py HOST PORT CONNECT_TIMEOUT STALL_TIMEOUT`, standard library
only, so it starts in milliseconds. Why a process and not a thread: TVM's client frees remote
handles while holding Python's GIL and waits for the daemon's answer, so a relay thread in the
same interpreter could never forward that answer (a deadlock), and a watchdog thread could never
run while such a call hangs. Here neither needs the host's interpreter.

Commands on stdin, one per line: `stage NAME` (a blocking call began: time it), `idle` (it ended),
`progress` (the host saw the device advance), `close`. End of stdin means the host is gone: the
relay closes both sides, so the daemon's session ends and the board is free again.
Reports on stdout: `error ERRNO TEXT` or `ready PORT` first, then `moved SENT RECEIVED`,
`peer-closed`, `stalled NAME`, and `closed` last.
"""

import fcntl
import socket
import struct
import sys
import termios
import threading
import time

CHUNK = 64 * 1024
# The daemon side asks the kernel to notice a dead peer (a cut link) within about a minute.
KEEPALIVE = ((socket.TCP_KEEPIDLE, 15), (socket.TCP_KEEPINTVL, 5), (socket.TCP_KEEPCNT, 6))
REPORT_S = 0.2


class State:
    def __init__(self, stall_timeout: float) -> None:
        self.stall_timeout = stall_timeout
        self.sent = self.received = 0
        self.last = time.monotonic()
        self.stage: str | None = None
        self.window: float | None = None  # a longer limit for one step that reports nothing
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.out_lock = threading.Lock()
        self.sockets: list[socket.socket] = []

    def say(self, line: str) -> None:
        with self.out_lock:
            try:
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
            except (OSError, ValueError):
                pass

    def close(self, why: str | None = None) -> None:
        with self.lock:
            if self.done.is_set():
                return
            self.done.set()
        if why:
            self.say(why)
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def pump(state: State, source: socket.socket, sink: socket.socket, upstream: bool) -> None:
    while not state.done.is_set():
        try:
            data = source.recv(CHUNK)
        except OSError:
            data = b""
        if not data:
            state.close("peer-closed" if upstream and not state.done.is_set() else None)
            return
        try:
            sink.sendall(data)
        except OSError:
            state.close("peer-closed" if not upstream else None)
            return
        if upstream:
            state.received += len(data)
            state.last = time.monotonic()
        else:
            state.sent += len(data)  # progress once acknowledged: see watch()


def unacked(sock: socket.socket) -> int:
    """Bytes handed to the kernel that the daemon's side has not acknowledged yet (Linux)."""
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        return int(struct.unpack("i", raw)[0])
    except OSError:
        return 0


def watch(state: State, upstream: socket.socket) -> None:
    """Progress is what reached the daemon: a send buffer can hold a whole upload at once, so
    bytes handed to the kernel say nothing on a slow or cut link; acknowledged ones do."""
    shown = (-1, -1)
    while not state.done.wait(REPORT_S):
        moved = (max(0, state.sent - unacked(upstream)), state.received)
        if moved != shown:
            if shown != (-1, -1):
                state.last = time.monotonic()
            shown = moved
            state.say(f"moved {moved[0]} {moved[1]}")
        stage = state.stage
        limit = state.window or state.stall_timeout
        if stage is not None and time.monotonic() - state.last > limit:
            state.close(f"stalled {stage}")


def commands(state: State) -> None:
    for line in sys.stdin:
        word, _, rest = line.strip().partition(" ")
        if word == "stage":
            state.stage, state.last, state.window = rest, time.monotonic(), None
        elif word == "window":
            state.window = float(rest)
        elif word == "idle":
            state.stage, state.window = None, None
        elif word == "progress":
            state.last = time.monotonic()
        elif word == "close":
            break
    state.close()


def main() -> int:
    host, port, connect_timeout, stall_timeout = sys.argv[1:5]
    try:
        upstream = socket.create_connection((host, int(port)), timeout=float(connect_timeout))
    except OSError as exc:
        kind = "timeout" if isinstance(exc, TimeoutError) else str(exc.errno or 0)
        print(f"error {kind} {exc.strerror or exc}", flush=True)
        return 1
    upstream.settimeout(None)
    upstream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in KEEPALIVE:
        upstream.setsockopt(socket.IPPROTO_TCP, option, value)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    state = State(float(stall_timeout))
    state.sockets = [upstream, listener]
    state.say(f"ready {listener.getsockname()[1]}")
    threading.Thread(target=commands, args=(state,), daemon=True).start()
    threading.Thread(target=watch, args=(state, upstream), daemon=True).start()
    listener.settimeout(float(connect_timeout) + 5)
    try:
        client, _ = listener.accept()
    except OSError:
        state.close()
        state.say("closed")
        return 0
    client.settimeout(None)
    state.sockets.append(client)
    threading.Thread(target=pump, args=(state, upstream, client, True), daemon=True).start()
    threading.Thread(target=pump, args=(state, client, upstream, False), daemon=True).start()
    state.done.wait()
    state.say(f"moved {state.sent} {state.received}")
    state.say("closed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
