"""What edgekit writes to a terminal: one line per message; everything else in a debug log.

While a command runs, the user's stderr belongs to edgekit alone: its one-line errors, its log
lines and its progress go to `terminal()` (and a line printed to sys.stderr that starts
`edgekit:` still reaches the user), and whatever else writes to stderr (a library's logging with
its tracebacks, Python's warnings, a thread or a destructor that failed, TVM's or torch's C++
warnings on file descriptor 2) lands in the debug log (`<cache>/logs/debug.log`, or a private file
in the temporary folder when the cache cannot be written). Every line edgekit writes is one line
whatever the input held: control characters are shown escaped. The CLI installs this for the length
of one command; the library itself never touches the process's streams.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Iterator, TextIO

from hostkit import __version__
from hostkit.defaults import cache_dir

__all__ = ["one_line", "debug_log", "debug_log_path", "terminal", "terminal_hygiene"]

# The debug log is started afresh (the old one kept as debug.log.1) once it is this large.
_ROTATE_BYTES = 8 << 20

_terminal: TextIO | None = None  # the user's stderr while a command runs
_log: TextIO | None = None  # the open debug log while a command runs


def one_line(text: str) -> str:
    """Text as one terminal line: newlines, escapes and other control characters shown escaped."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace")
                   .decode("ascii") for c in text)


def terminal() -> TextIO:
    """Where edgekit's own lines go: the user's stderr, also while stderr is diverted."""
    return _terminal or sys.stderr


def debug_log_path() -> Path:
    """Where the debug log is; the open one when a command runs."""
    name = getattr(_log, "name", None)
    return Path(name) if isinstance(name, str) else cache_dir() / "logs" / "debug.log"


def debug_log(text: str) -> Path | None:
    """Append text to the debug log; where it went, or None if no place would take it."""
    if _log is not None:
        _log.write(f"{text.rstrip()}\n")
        _log.flush()
        return debug_log_path()
    log = _open_log()
    if log is None:
        return None
    with log:
        log.write(f"{text.rstrip()}\n")
    return Path(log.name)


def _open_log() -> TextIO | None:
    """The debug log, opened to append, with a line saying which run writes below it."""
    fallback = Path(tempfile.gettempdir()) / f"edgekit-debug-{os.getuid()}.log"
    for path in (cache_dir() / "logs" / "debug.log", fallback):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_file() and path.stat().st_size > _ROTATE_BYTES:
                os.replace(path, path.with_name(path.name + ".1"))
            # O_NOFOLLOW: the fallback sits in a shared folder where a link could be planted.
            log = open(path, "a", encoding="utf-8", errors="backslashreplace", buffering=1,
                       opener=lambda name, flags: os.open(name, flags | os.O_NOFOLLOW, 0o600))
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} edgekit {__version__} "
                      f"pid {os.getpid()}\n")
            return log
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
            record.msg = f"{record.getMessage()} (traceback in {debug_log_path()})"
            record.args = None
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


class _Diverted(io.TextIOBase):
    """sys.stderr while a command runs: a line that starts `edgekit:` (an edgekit message, from
    whichever module printed it) goes to the user's terminal, every other line to the debug log."""

    encoding = "utf-8"

    def __init__(self, log: TextIO, user: TextIO) -> None:
        super().__init__()
        self._log, self._user, self._pending = log, user, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            (self._user if line.startswith("edgekit:") else self._log).write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self._log.flush()
        self._user.flush()

    def close_line(self) -> None:
        """A last line without its newline still goes somewhere."""
        if self._pending:
            self.write("\n")

    def fileno(self) -> int:  # a child given sys.stderr writes into the debug log
        return self._log.fileno()


def _fd(stream: TextIO) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None  # a stream in memory (a test's capture): there is no descriptor to divert


@contextlib.contextmanager
def terminal_hygiene(verbose: bool) -> Iterator[TextIO]:
    """For one command: the user's stderr for edgekit's own lines (yielded, and `terminal()`),
    stderr itself, down to file descriptor 2, diverted to the debug log, log records one line each,
    and no traceback printed by logging, a thread or a destructor."""
    global _terminal, _log
    user = sys.stderr
    log = _open_log()
    saved_fd = None
    if log is not None and _fd(user) == 2:
        user.flush()
        saved_fd = os.dup(2)
        _terminal = open(saved_fd, "w", encoding=getattr(user, "encoding", None) or "utf-8",
                         errors="backslashreplace", buffering=1, closefd=False)
        os.dup2(log.fileno(), 2)  # C and C++ code (TVM, torch) write here too
    else:
        _terminal = user
    diverted = _Diverted(log, _terminal) if log is not None else None
    if diverted is not None:
        sys.stderr = diverted
    _log = log
    root = logging.getLogger()
    shown = logging.StreamHandler(_terminal)
    shown.setFormatter(_OneLineFormatter())
    shown.addFilter(_TerminalFilter(verbose))
    kept = _DebugLogHandler()
    saved = (root.level, logging.raiseExceptions, threading.excepthook, sys.unraisablehook)
    root.addHandler(kept)  # first: it sees a record's traceback before the terminal drops it
    root.addHandler(shown)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.raiseExceptions = False
    logging.captureWarnings(True)
    # Booting or building the emulated board takes seconds to minutes: show its steps.
    logging.getLogger("edgekit.board").setLevel(logging.INFO)
    threading.excepthook = _thread_died
    sys.unraisablehook = _unraisable
    try:
        yield _terminal
    finally:
        logging.captureWarnings(False)
        root.removeHandler(shown)
        root.removeHandler(kept)
        root.setLevel(saved[0])
        logging.raiseExceptions, threading.excepthook, sys.unraisablehook = saved[1:]
        with contextlib.suppress(OSError, ValueError):
            if diverted is not None:
                diverted.close_line()
            sys.stderr.flush()
            _terminal.flush()
        if saved_fd is not None:
            os.dup2(saved_fd, 2)
            _terminal.close()
            os.close(saved_fd)
        sys.stderr = user
        _terminal, _log = None, None
        if log is not None:
            log.close()


def _thread_died(hook: Any) -> None:
    text = "".join(traceback.format_exception(hook.exc_type, hook.exc_value, hook.exc_traceback))
    where = debug_log(f"in thread {getattr(hook.thread, 'name', '?')}:\n{text}")
    saved = f"traceback in {where}" if where else "no debug log could be written"
    print(one_line(f"edgekit: unexpected error in a background thread: {hook.exc_type.__name__} "
                   f"({saved}; please report it)"), file=terminal())


def _unraisable(hook: Any) -> None:
    """An exception Python could not raise (in a destructor, say): the debug log, not stderr."""
    try:
        where = repr(hook.object)[:200]
    except Exception:  # a broken __repr__ must not bring the traceback back to the terminal
        where = type(hook.object).__name__
    debug_log(f"ignored in {where}:\n" + "".join(
        traceback.format_exception(hook.exc_type, hook.exc_value, hook.exc_traceback)))
