"""A tune through a TVM RPC tracker measures on every board registered under the device's key."""

from __future__ import annotations

import io
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from hostkit.net import port_open

KEY = "ek17-fleet"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def tracker(tmp_path: Path) -> Iterator[int]:
    """A real `edgekit-device tracker` on loopback; yields its port."""
    port = _free_port()
    log = open(tmp_path / "tracker.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "devicekit", "tracker", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while not port_open("127.0.0.1", port, 0.5):
        assert proc.poll() is None and time.monotonic() < deadline, "the tracker did not start"
        time.sleep(0.2)
    yield port
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=15)
    log.close()


def _sessions(daemon: Any) -> int:
    """Sessions the daemon has served: TVM's server logs one line as each one starts."""
    return daemon.logs().count("connected from")


@pytest.mark.integration
@pytest.mark.slow
def test_tune_through_a_tracker_measures_on_every_board(
        tracker: int, tmp_path: Path, write_inventory: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import Daemon
    from tvm import rpc

    from hostkit.inventory import load_inventory
    from hostkit.models import ModelSpec
    from hostkit.run.tune import tune_on_device

    boards = []
    for name in ("board-a", "board-b"):
        (tmp_path / name).mkdir()
        boards.append(Daemon(tmp_path / name, ["--tracker", f"127.0.0.1:{tracker}",
                                               "--key", KEY]))
    try:
        deadline = time.monotonic() + 60
        while rpc.connect_tracker("127.0.0.1", tracker).summary()["queue_info"].get(
                KEY, {}).get("free", 0) < 2:
            assert time.monotonic() < deadline, "the boards did not register with the tracker"
            time.sleep(0.5)
        monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache"))
        inv = write_inventory({"devices": {"fleet": {
            "target": {"kind": "llvm"}, "transport": "tracker",
            "tracker": f"127.0.0.1:{tracker}", "key": KEY}}})
        from rich.console import Console

        console = Console(file=io.StringIO(), width=100, color_system=None)
        # 8 trials over tinycnn's tasks: batches of 2 candidates, one per board.
        summary = tune_on_device(load_inventory(inv).get("fleet"),
                                 ModelSpec("tinycnn", input_shape=(1, 3, 16, 16)), trials=8,
                                 trials_per_task=2, time_budget_min=None, console=console)
        sessions = [_sessions(board) for board in boards]
    finally:
        for board in boards:
            board.stop()
    assert summary["boards"] == 2 and summary["valid_trials"] > 0
    assert f"measuring on 2 boards under key '{KEY}'" in console.file.getvalue()
    # One session reads the device's report; every other one measured a candidate. Each board
    # served at least two, so each measured at least one candidate.
    assert all(count >= 2 for count in sessions), sessions
    assert sum(sessions) >= summary["trials"] + 1, (sessions, summary["trials"])
