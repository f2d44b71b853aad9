"""Tuning trials per minute with 1 and with N boards under one tracker key.

Each board is an `edgekit-device serve` in a network namespace of its own (`ek17-b1`, ...,
joined by the bridge `ek17-br`), registered with an `edgekit-device tracker` on the bridge under
one key, as a rack of identical boards would be. For each board count the same model is tuned
from no records (a fresh cache) with the same trials, and the run prints trials per minute and the
time spent waiting for measurements. Needs root and iproute2; everything it creates is removed at
the end, also when interrupted.

    sudo .venv/bin/python bench/bench_fleet_tune.py --boards 1 3 --trials 96

On one machine the "boards" share its cores with each other and with the host's builder, so the
figure shows what the runner parallelises (sessions, uploads, timing), not a rack's speed-up.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PREFIX = "ek17"
BRIDGE, BRIDGE_IP = f"{PREFIX}-br", "169.254.217.1"
KEY = f"{PREFIX}-bench"
TRACKER_PORT = 9190


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def network_up(boards: int) -> list[str]:
    """The bridge and one namespace per board; returns the boards' addresses."""
    network_down(boards)
    _ip("link", "add", BRIDGE, "type", "bridge")
    _ip("addr", "add", f"{BRIDGE_IP}/24", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")
    addresses = []
    for i in range(1, boards + 1):
        ns, host_end, ns_end = f"{PREFIX}-b{i}", f"{PREFIX}-h{i}", f"{PREFIX}-d{i}"
        address = f"169.254.217.{10 + i}"
        _ip("netns", "add", ns)
        _ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
        _ip("link", "set", ns_end, "netns", ns)
        _ip("link", "set", host_end, "master", BRIDGE)
        _ip("link", "set", host_end, "up")
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", ns_end)
        _ip("-n", ns, "link", "set", ns_end, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        addresses.append(address)
    return addresses


def network_down(boards: int) -> None:
    for i in range(1, boards + 1):
        subprocess.run(["ip", "netns", "del", f"{PREFIX}-b{i}"], capture_output=True)
        subprocess.run(["ip", "link", "del", f"{PREFIX}-h{i}"], capture_output=True)
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


def _start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_registered(count: int) -> None:
    from tvm import rpc

    deadline = time.monotonic() + 120
    while True:
        try:
            queue = rpc.connect_tracker(BRIDGE_IP, TRACKER_PORT).summary()["queue_info"]
            if queue.get(KEY, {}).get("free", 0) >= count:
                return
        except Exception:  # the tracker is still starting
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{count} boards did not register with the tracker within 120 s")
        time.sleep(0.5)


def tune_with(boards: int, addresses: list[str], args: argparse.Namespace,
              work: Path) -> dict[str, Any]:
    from hostkit.inventory import parse_inventory
    from hostkit.models import ModelSpec
    from hostkit.run.tune import tune_on_device

    python = sys.executable
    procs = [_start([python, "-m", "devicekit", "tracker", "--listen", BRIDGE_IP, "--port",
                     str(TRACKER_PORT)], work / f"tracker-{boards}.log")]
    try:
        for i, address in enumerate(addresses[:boards], start=1):
            procs.append(_start(["ip", "netns", "exec", f"{PREFIX}-b{i}", python, "-m",
                                 "devicekit", "serve", "--listen", address, "--port", "9090",
                                 "--tracker", f"{BRIDGE_IP}:{TRACKER_PORT}", "--key", KEY,
                                 "--store", str(work / f"store-{i}")],
                                work / f"board-{boards}-{i}.log"))
        _wait_registered(boards)
        os.environ["EDGEKIT_CACHE"] = tempfile.mkdtemp(prefix="cache-", dir=work)  # from nothing
        device = parse_inventory({"devices": {"rack": {
            "target": {"kind": "llvm"}, "transport": "tracker",
            "tracker": f"{BRIDGE_IP}:{TRACKER_PORT}", "key": KEY}}}).get("rack")
        shape = tuple(int(d) for d in args.input_shape.split(","))
        summary = tune_on_device(device, ModelSpec(args.model, input_shape=shape),
                                 trials=args.trials, trials_per_task=None, time_budget_min=None,
                                 console=None)
    finally:
        for proc in reversed(procs):
            _stop(proc)
    # TVM's server logs a line as each session starts: one reads the device's report, each of
    # the others measured a candidate.
    summary["sessions"] = [(work / f"board-{boards}-{i}.log").read_text(errors="replace")
                           .count("connected from") for i in range(1, boards + 1)]
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boards", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--model", default="tinycnn")
    parser.add_argument("--input-shape", default="1,3,32,32")
    parser.add_argument("--trials", type=int, default=96)
    args = parser.parse_args()
    if os.geteuid() != 0 or not shutil.which("ip"):
        print("bench_fleet_tune: network namespaces need root and iproute2", file=sys.stderr)
        return 1
    # SIGTERM ends the run through the cleanup below, as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    most = max(args.boards)
    work = Path(tempfile.mkdtemp(prefix="ek17-fleet-"))
    rows = []
    try:
        addresses = network_up(most)
        for boards in args.boards:
            summary = tune_with(boards, addresses, args, work)
            minutes = summary["tune_s"] / 60.0
            rows.append((boards, summary["trials"], summary["valid_trials"], summary["tune_s"],
                         summary["measure_s"], summary["trials"] / minutes))
            print(f"{boards} board(s): {summary['trials']} trials in {summary['tune_s']:.0f} s "
                  f"({summary['measure_s']:.0f} s measuring); sessions per board: "
                  f"{summary['sessions']}", flush=True)
    finally:
        network_down(most)
        shutil.rmtree(work, ignore_errors=True)
    base = rows[0][5]
    print(f"\n{args.model} {args.input_shape}, {args.trials} trials, cores here: {os.cpu_count()}")
    print("| boards | trials | valid | tune s | measuring s | trials/min | vs first |")
    print("|---|---|---|---|---|---|---|")
    for boards, trials, valid, tune_s, measure_s, rate in rows:
        print(f"| {boards} | {trials} | {valid} | {tune_s:.0f} | {measure_s:.0f} | {rate:.1f} | "
              f"{rate / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
