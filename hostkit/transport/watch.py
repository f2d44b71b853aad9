"""Stall detection: a device that makes no progress for `stall_timeout` fails, however long the
work it is doing may take.

Every blocking RPC call runs inside `Watch.stage(name)`. The session's relay (its own process,
see `relay_process.py`) times the stage: bytes passing and the host's progress marks (a
benchmark reports after every chunk of runs) reset the clock; when neither came for
`stall_timeout`, it cuts the connection, the blocked call returns, and the stage raises "stopped
answering during <stage>". Between stages (the host compiling, say) nothing is expected of the
device and nothing is timed. A daemon that closed the connection itself is told apart: it crashed
or was killed, and the message says so, with the last lines of its log when edgekit started it.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

from hostkit.errors import EdgekitError, RemoteError, first_line
from hostkit.transport.relay import Relay

__all__ = ["Watch", "LogTail"]

LogTail = Callable[[], str]  # the last lines of the daemon's log, "" when edgekit cannot see it


class Watch:
    """One RPC session's watchdog: `stage()` around each call, `progress()` between chunks."""

    def __init__(self, device: str, relay: Relay, stall_timeout: float, address: str,
                 log_tail: LogTail | None = None, session_timeout: float | None = None) -> None:
        self.device = device
        self.relay = relay
        self.stall_timeout = stall_timeout
        # One step whose length nothing tells beforehand (a model's first inference) may take up
        # to the user's upper bound: it reports no progress until it ends.
        self.session_timeout = session_timeout or stall_timeout
        self.limit = stall_timeout  # the current stage's
        self.address = address
        self.log_tail = log_tail or (lambda: "")
        self.timed_session = session_timeout is not None  # the daemon ends it after that long
        self.started = time.monotonic()

    def progress(self) -> None:
        """The host saw the device advance (a chunk of a benchmark came back)."""
        self.relay.progress()

    @contextmanager
    def stage(self, name: str, window: float | None = None) -> Iterator[None]:
        """Run one blocking step; a stall or a vanished daemon becomes one clear RemoteError.
        `window`: a step known to take longer without progress may pass that long instead."""
        self.relay.stage(name)
        self.limit = self.stall_timeout
        if window is not None and window > self.stall_timeout:
            self.relay.window(window)
            self.limit = window
        try:
            yield
        except EdgekitError as exc:
            raise self.failure(name, exc) or exc
        except Exception as exc:
            failure = self.failure(name, exc)
            if failure is None:
                raise
            raise failure from exc
        finally:
            self.relay.stage(None)

    def failure(self, stage: str, exc: BaseException | None) -> RemoteError | None:
        """The error to report when the session is gone, or None while it is healthy."""
        if not (self.relay.closed or self.relay.peer_closed or self.relay.stalled_in):
            self.relay.settle(1.0 if exc is not None and _closed_text(exc) else 0.2)
        if self.relay.stalled_in is not None:
            return RemoteError(
                f"stopped answering during {stage}: no progress for {self.limit:g}s "
                f"({'stall_timeout' if self.limit == self.stall_timeout else 'this step'}) at "
                f"{self.address}", device=self.device, stage=stage,
                hint="the daemon or the board froze, or the link dropped; check it with "
                     f"`edgekit doctor --device {self.device}`, and raise stall_timeout if one "
                     "step of this model really takes longer")
        if self.relay.cut_by_host and not self.relay.peer_closed:
            return RemoteError(f"edgekit closed the session during {stage} (interrupted)",
                               device=self.device, stage=stage)
        if self.relay.peer_closed or (exc is not None and _closed_text(exc)):
            tail = self.log_tail()
            shown = f"; its log ends: {tail}" if tail else ""
            elapsed = time.monotonic() - self.started
            if "timeout in RPC session" in tail or (
                    self.timed_session and elapsed >= self.session_timeout - 1.0):
                # TVM's server ends a session at the timeout the host asked for, as if killed
                return RemoteError(
                    f"the session reached session_timeout ({self.session_timeout:g}s) during "
                    f"{stage}, after {elapsed:.0f}s, and the daemon at {self.address} ended it",
                    device=self.device, stage=stage,
                    hint=f"raise session_timeout for {self.device} in the inventory (one "
                         "untuned run of a large detector can take minutes), or run fewer "
                         "--repeat/--warmup runs")
            return RemoteError(
                f"the daemon at {self.address} closed the connection during {stage}: it "
                f"crashed or was killed (out of memory on the board?){shown}",
                device=self.device, stage=stage,
                hint="restart it (`edgekit-device serve`) and look at the board's memory "
                     "(`dmesg | grep -i oom`); then run again")
        return None

    def close(self) -> None:
        self.relay.close()


def _closed_text(exc: BaseException) -> bool:
    """TVM's words for a session whose socket ended under it."""
    text = first_line(exc) + str(exc)[-400:]
    return "kShutdown" in text or "connection reset" in text.lower()
