"""A byte relay in front of every RPC session, so the host can see progress and cut a stall.

TVM's RPC client lives in C++: its calls block on a socket Python never sees, with no timeout.
Each session therefore connects to a relay on the host's loopback, which forwards to the daemon
(or to the SSH tunnel in front of it) and counts the bytes that pass. The relay runs in a small
process of its own (`relay_process.py` says why) that also enforces `stall_timeout` while a call
is under way: on a stall it cuts both sides, the C++ client reads end-of-stream and the blocked
call returns with an error instead of never. It also tells a daemon that closed the connection
(crashed, killed) from one that went silent, which the error messages need.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import weakref
from pathlib import Path

__all__ = ["Relay", "RelayError", "close_all_relays"]

SCRIPT = Path(__file__).with_name("relay_process.py")
_LIVE: "weakref.WeakSet[Relay]" = weakref.WeakSet()


def close_all_relays() -> None:
    """Cut every open session (Ctrl-C): blocked calls return, daemons drop the work."""
    for relay in list(_LIVE):
        relay.close()


class RelayError(OSError):
    """The relay could not reach the daemon; `kind` is "timeout" or the errno's name."""

    def __init__(self, kind: str, text: str) -> None:
        super().__init__(text)
        self.kind = kind


class Relay:
    """Forward one loopback connection to host:port, in a child process that guards stalls."""

    def __init__(self, host: str, port: int, connect_timeout: float, stall_timeout: float) -> None:
        self.sent = 0  # host -> daemon bytes the daemon's side accepted
        self.received = 0  # daemon -> host bytes
        self.peer_closed = False  # the daemon ended the connection (not edgekit)
        self.stalled_in: str | None = None  # the stage the relay cut for lack of progress
        self.closed = False
        self.cut_by_host = False  # edgekit closed it (done, or Ctrl-C), not the daemon
        self._ended = threading.Event()
        self.proc = subprocess.Popen(
            [sys.executable, "-S", "-E", str(SCRIPT), host, str(port), repr(connect_timeout),
             repr(stall_timeout)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, bufsize=1)
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline().split(maxsplit=2)
        if not first or first[0] != "ready":
            self.proc.wait()
            self._ended.set()
            self.closed = True
            kind, text = (first[1], first[2] if len(first) > 2 else "") if first[:1] == ["error"] \
                else ("0", "the relay did not start")
            raise RelayError(kind, text)
        self.port = int(first[1])
        _LIVE.add(self)
        threading.Thread(target=self._read, daemon=True, name=f"relay-{self.port}").start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            word, _, rest = line.strip().partition(" ")
            if word == "moved":
                sent, received = rest.split()
                self.sent, self.received = int(sent), int(received)
            elif word == "peer-closed":
                self.peer_closed = True
            elif word == "stalled":
                self.stalled_in = rest
            elif word == "closed":
                self.closed = True
        self.closed = True
        self._ended.set()

    @property
    def moved(self) -> int:
        return self.sent + self.received

    def _tell(self, line: str) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (OSError, ValueError):
            pass  # the relay already ended; its last report says why

    def stage(self, name: str | None) -> None:
        """A blocking call began (timed for stalls), or ended (None)."""
        self._tell(f"stage {name}" if name else "idle")

    def window(self, seconds: float) -> None:
        """The current stage may pass `seconds` without progress (one long step)."""
        self._tell(f"window {seconds!r}")

    def progress(self) -> None:
        self._tell("progress")

    def settle(self, timeout: float = 3.0) -> None:
        """Wait for the relay's last word after a failed call: did it stall, did the peer go?
        A relay that already exited may still have lines (`stalled ...`) the reader has not
        taken: its end of output, not its exit, is the last word."""
        self._ended.wait(timeout)

    def close(self) -> None:
        """Cut both sides: a call blocked in TVM's client returns with an error at once."""
        self.cut_by_host = not self.closed
        self._tell("close")
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._ended.wait(2)
        self.closed = True
        pipes = [self.proc.stdin] + ([self.proc.stdout] if self._ended.is_set() else [])
        for pipe in pipes:
            try:
                if pipe is not None:
                    pipe.close()
            except OSError:
                pass
