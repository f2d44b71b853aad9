"""What edgekit writes to a terminal: one line per message, and tracebacks in a debug log.

A user's terminal gets one line per error whatever the input held: control characters are shown
escaped. A traceback, whether from edgekit, from a library's logging, from Python's warnings, from a
thread or from a destructor, goes to the debug log (`<cache>/logs/debug.log`, or a private file in
the temporary folder when the cache cannot be written), and the line on the terminal names it.
Only the CLI installs this, for the length of one command.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

from hostkit import __version__
from hostkit.defaults import cache_dir

__all__ = ["one_line", "debug_log", "debug_log_path", "terminal_hygiene"]


def one_line(text: str) -> str:
    """Text as one terminal line: newlines, escapes and other control characters shown escaped."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace")
                   .decode("ascii") for c in text)


def debug_log_path() -> Path:
    return cache_dir() / "logs" / "debug.log"


def debug_log(text: str) -> Path | None:
    """Append text to the debug log; where it went, or None if no place would take it."""
    fallback = Path(tempfile.gettempdir()) / f"edgekit-debug-{os.getuid()}.log"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    for path in (debug_log_path(), fallback):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # O_NOFOLLOW: the fallback sits in a shared folder where a link could be planted.
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace") as log:
                log.write(f"--- {stamp} edgekit {__version__}\n{text.rstrip()}\n")
            return path
        except OSError:
            continue
    return None


class _TerminalFilter(logging.Filter):
    """Tracebacks and Python warnings stay off the terminal: they go to the debug log, and with
    --verbose the terminal gets their first line and the log's path."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.verbose:
            # The caller reports the failure in its own line; the traceback is in the debug log.
            return not (record.exc_info or record.stack_info or record.name == "py.warnings")
        if record.exc_info or record.stack_info:
            record.exc_info, record.exc_text, record.stack_info = None, None, None
            record.msg, record.args = f"{record.getMessage()} (traceback in {debug_log_path()})", None
        return True


class _OneLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return one_line(f"{record.name} {record.levelname} {record.getMessage()}")


class _DebugLogHandler(logging.Handler):
    """Writes the records that carry a traceback, and Python warnings, to the debug log."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.stack_info or record.name == "py.warnings":
            debug_log(self.format(record))


@contextlib.contextmanager
def terminal_hygiene(verbose: bool) -> Iterator[None]:
    """For one command: log lines one line each on stderr, tracebacks and warnings in the debug
    log, and no traceback printed by a thread, a destructor or logging itself."""
    root = logging.getLogger()
    terminal = logging.StreamHandler(sys.stderr)
    terminal.setFormatter(_OneLineFormatter())
    terminal.addFilter(_TerminalFilter(verbose))
    debug = _DebugLogHandler()
    saved = (root.level, logging.raiseExceptions, threading.excepthook, sys.unraisablehook)
    # The debug log handler first: it sees a record's traceback before the terminal drops it.
    root.addHandler(debug)
    root.addHandler(terminal)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.raiseExceptions = False
    logging.captureWarnings(True)
    # Booting or building the emulated board takes seconds to minutes: show its steps.
    logging.getLogger("edgekit.board").setLevel(logging.INFO)

    threading.excepthook = _thread_died
    sys.unraisablehook = _unraisable
    try:
        yield
    finally:
        logging.captureWarnings(False)
        root.removeHandler(terminal)
        root.removeHandler(debug)
        root.setLevel(saved[0])
        logging.raiseExceptions, threading.excepthook, sys.unraisablehook = saved[1:]


def _thread_died(hook: Any) -> None:
    text = "".join(traceback.format_exception(hook.exc_type, hook.exc_value, hook.exc_traceback))
    where = debug_log(f"in thread {getattr(hook.thread, 'name', '?')}:\n{text}")
    saved = f"traceback in {where}" if where else "no debug log could be written"
    print(one_line(f"edgekit: unexpected error in a background thread: {hook.exc_type.__name__} "
                   f"({saved}; please report it)"), file=sys.stderr)


def _unraisable(hook: Any) -> None:
    """An exception Python could not raise (in a destructor, say): the debug log, not stderr."""
    try:
        where = repr(hook.object)[:200]
    except Exception:  # a broken __repr__ must not bring the traceback back to the terminal
        where = type(hook.object).__name__
    debug_log(f"ignored in {where}:\n" + "".join(
        traceback.format_exception(hook.exc_type, hook.exc_value, hook.exc_traceback)))
