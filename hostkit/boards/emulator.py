"""The emulated Raspberry Pi 4: Debian arm64 run with qemu-user in a network namespace of its own,
reachable from the host over a veth pair like a board on its own cable::

    host: ek-pi4-emu-h 169.254.42.1/30  <--veth-->  eth0 169.254.42.2/30 in netns ek-pi4-emu
                                                     chroot ROOTFS python -m devicekit serve

The board address is the device's `host` in the inventory; the host side takes the other usable
address of that /30. The daemon runs in a private mount namespace (its /proc, /sys, /tmp and
/dev/shm vanish with it, so there is nothing to unmount) and a UTS namespace (its hostname is the
device name). What `start` created is kept in a state file, so `edgekit board status|down` in
another process finds it. `running()` never sends a packet: it checks the namespace and the pid.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from hostkit.boards.image import (
    BOARD_VENV,
    Progress,
    check_host,
    chroot_shell,
    ensure_binfmt,
    ensure_image,
    image_key,
    image_rootfs,
    install_devicekit,
    run_step,
)
from hostkit.defaults import PROBE_TIMEOUT_S
from hostkit.errors import ConnectError, InventoryError
from hostkit.inventory import Device
from hostkit.net import port_open

__all__ = ["EmulatedBoard", "board_up", "board_down", "board_status"]

log = logging.getLogger("edgekit.board")

NETNS_DIR = Path("/run/netns")
# Boards are machine-wide like their namespaces, so their state is too (not under EDGEKIT_CACHE).
RUN_DIR = Path("/run/edgekit/boards")
# Daemons started by this process, kept so they can be reaped (and not warned about) on stop.
_CHILDREN: dict[str, subprocess.Popen[bytes]] = {}


class EmulatedBoard:
    """One emulated arm64 board for an inventory device with `managed: qemu-arm64`."""

    # Never probe the board address before our namespace exists: it would leave the host.
    attach_to_existing = False
    # Measured: about 10 s from launch to a listening daemon on a 2-core x86_64 host.
    START_TIMEOUT_S = 180.0
    STOP_TIMEOUT_S = 20.0

    def __init__(self, device: Device, progress: Progress | None = None,
                 baselines: tuple[str, ...] = ()) -> None:
        self.device = device
        self.progress: Progress = progress or log.info
        # Baseline engines in the board's image (an image of their own; see hostkit.boards.image).
        self.baselines = baselines
        self.hostname, self.netns, self.host_veth = _names(device.name)
        self.board_ip, self.host_ip = _addresses(device)
        self.state_file = RUN_DIR / f"{self.netns}.json"
        self.log_file = RUN_DIR / f"{self.netns}.log"
        self._lock_file = RUN_DIR / f"{self.netns}.lock"
        # Inside the rootfs: the board's own files, kept on disk across boots.
        self.board_dir = f"/var/lib/edgekit/{self.netns}"

    @classmethod
    def for_device(cls, device: Device, progress: Progress | None = None,
                   baselines: tuple[str, ...] = ()) -> "EmulatedBoard":
        if device.managed != "qemu-arm64":
            raise InventoryError(f"device {device.name} has managed: {device.managed}, not "
                                 "qemu-arm64, so edgekit does not emulate it")
        return cls(device, progress, baselines)

    def running(self) -> bool:
        state = self._read_state()
        return (state is not None and _netns_exists(self.netns)
                and _alive(int(state["pid"]), int(state["pid_start"])))

    def address(self) -> tuple[str, int]:
        return self.board_ip, self.device.port

    def start(self) -> tuple[str, int]:
        """Boot the board (building its image first if needed); a running board is kept."""
        check_host(self.device.name)
        with self._locked():
            if self.running():
                return self.address()
            self._teardown()  # whatever a crashed board left behind
            rootfs = ensure_image(self.progress, self.device.name, self.baselines)
            ensure_binfmt(self.device.name)  # registrations do not survive a reboot; images do
            started = time.monotonic()
            if install_devicekit(rootfs / self.board_dir.lstrip("/") / "app"):
                self.progress(f"{self.device.name}: copied this host's devicekit onto the board")
            try:
                self._network_up()
                self._launch(rootfs)
                port = self._wait_ready(rootfs, started)
            except BaseException:
                self._teardown()
                raise
        self.progress(f"{self.device.name}: board up at {self.board_ip}:{port} "
                      f"in {time.monotonic() - started:.1f}s")
        return self.board_ip, port

    def stop(self) -> None:
        """Stop the daemon and remove the namespace and veth; stopping a stopped board is fine."""
        check_host(self.device.name, tools=("ip",))
        with self._locked():
            self._teardown()

    def status(self) -> dict[str, Any]:
        state = self._read_state() or {}
        running = self.running()
        leftovers = bool(state) or _netns_exists(self.netns)
        key = (state.get("image") if running else None) or image_key(self.baselines)
        return {
            "device": self.device.name,
            "state": "running" if running else "stale" if leftovers else "stopped",
            "address": f"{self.board_ip}:{self.device.port}",
            "host_side": f"{self.host_ip} ({self.host_veth})",
            "netns": self.netns,
            "pid": state.get("pid") if running else None,
            "uptime_s": round(time.time() - state["started_at"], 1) if running else None,
            "image": key,
            "image_built": image_rootfs(key).is_dir(),
            "baselines": ", ".join(state.get("baselines", [])) if running else None,
            "rootfs": state["rootfs"] if running else str(image_rootfs(key)),
            "log": str(self.log_file),
        }

    def _network_up(self) -> None:
        network = ipaddress.ip_network(f"{self.board_ip}/30", strict=False)
        for line in _ip(["-o", "-4", "addr", "show"]).splitlines():
            fields = line.split()
            if ipaddress.ip_interface(fields[3]).ip in network:
                raise ConnectError(f"{network} is already used by interface {fields[1]} on this "
                                   "host", device=self.device.name, stage="start",
                                   hint="give the emulated board another host: address (its own "
                                        "/30) in the inventory")
        _ip(["netns", "add", self.netns])
        _ip(["link", "add", self.host_veth, "type", "veth", "peer", "name", "eth0",
             "netns", self.netns])
        _ip(["addr", "add", f"{self.host_ip}/30", "dev", self.host_veth])
        _ip(["link", "set", self.host_veth, "up"])
        for args in (["addr", "add", f"{self.board_ip}/30", "dev", "eth0"],
                     ["link", "set", "eth0", "up"], ["link", "set", "lo", "up"]):
            _ip(["-n", self.netns, *args])

    def _launch(self, rootfs: Path) -> None:
        root = shlex.quote(str(rootfs))
        board = rootfs / self.board_dir.lstrip("/")
        (board / "port").unlink(missing_ok=True)
        # qemu-user shows the host's /proc/cpuinfo, an x86 CPU on an aarch64 board; say what it is.
        (board / "cpuinfo").write_text(_cpuinfo(), encoding="utf-8")
        # The host's sysfs describes its x86 CPUs; aarch64 code that reads the topology there
        # (pytorch's cpuinfo, inside ONNX Runtime and torch) crashed at import on it. The board
        # shows only the list of its CPUs, as qemu-user runs it on the host's.
        cpus = shlex.quote(_cpu_list())
        cpu_dir = f"{root}/sys/devices/system/cpu"
        setup = [f"echo {self.hostname} > /proc/sys/kernel/hostname",
                 f"mount --bind {root}{self.board_dir}/cpuinfo {root}/proc/cpuinfo",
                 f"mount -t sysfs sysfs {root}/sys",
                 f"mount -t tmpfs -o mode=0755 tmpfs {cpu_dir}",
                 *[f"echo {cpus} > {cpu_dir}/{name}" for name in ("possible", "present",
                                                                   "online")],
                 f"mount -t tmpfs -o mode=1777 tmpfs {root}/tmp",
                 f"mount -t tmpfs -o mode=1777 tmpfs {root}/dev/shm"]
        argv = [f"{BOARD_VENV}/bin/python", "-m", "devicekit", "serve",
                "--listen", self.board_ip, "--port", str(self.device.port),
                "--port-file", f"{self.board_dir}/port",
                "--store", f"{self.board_dir}/artifacts"]
        cmd = chroot_shell(rootfs, argv, setup=setup, env={"PYTHONPATH": f"{self.board_dir}/app"},
                           prefix=["ip", "netns", "exec", self.netns], unshare=["--uts"])
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        # One log per board across boots, started afresh once it passes 1 MiB.
        fresh = self.log_file.exists() and self.log_file.stat().st_size > 1 << 20
        with open(self.log_file, "wb" if fresh else "ab") as output:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            output.write(f"--- {stamp} edgekit boots {self.device.name}\n".encode())
            output.flush()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=output,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        _CHILDREN[self.netns] = proc
        # Every step of cmd execs the next, so proc.pid ends up being the daemon itself.
        state = {"device": self.device.name, "pid": proc.pid, "pid_start": _start_ticks(proc.pid),
                 "netns": self.netns, "host_veth": self.host_veth, "board": self.board_ip,
                 "port": self.device.port, "rootfs": str(rootfs), "started_at": time.time(),
                 "image": rootfs.parent.name, "baselines": list(self.baselines)}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.state_file)

    def _wait_ready(self, rootfs: Path, started: float) -> int:
        port_file = rootfs / self.board_dir.lstrip("/") / "port"
        proc = _CHILDREN[self.netns]
        deadline = started + self.START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ConnectError(f"the board's daemon exited with code {proc.returncode}: "
                                   f"{_tail(self.log_file)}", device=self.device.name,
                                   stage="start", hint=f"full log in {self.log_file}")
            text = port_file.read_text(encoding="utf-8").strip() if port_file.exists() else ""
            if text.isdigit() and port_open(self.board_ip, int(text), PROBE_TIMEOUT_S):
                return int(text)
            time.sleep(0.2)
        raise ConnectError(f"the board's daemon did not answer within {self.START_TIMEOUT_S:.0f}s",
                           device=self.device.name, stage="start",
                           hint=f"see {self.log_file}")

    def _teardown(self) -> None:
        # Our own daemon, if this process started it: it must be reaped, or it lingers as a zombie.
        child = _CHILDREN.pop(self.netns, None)
        state = self._read_state()
        if state is not None and _alive(int(state["pid"]), int(state["pid_start"])):
            os.kill(int(state["pid"]), signal.SIGTERM)
            self._wait_gone([int(state["pid"])], child)
        if _netns_exists(self.netns):
            # Whatever still runs in the namespace is ours: TVM's server worker and its sessions.
            pids = [int(p) for p in _ip(["netns", "pids", self.netns]).split()]
            for pid in pids:
                _kill(pid)
            self._wait_gone(pids, child)
        if child is not None:
            child.wait(timeout=self.STOP_TIMEOUT_S)
        if Path(f"/sys/class/net/{self.host_veth}").exists():
            _ip(["link", "del", self.host_veth])
        if _netns_exists(self.netns):
            _ip(["netns", "del", self.netns])
        self.state_file.unlink(missing_ok=True)

    def _wait_gone(self, pids: list[int], child: subprocess.Popen[bytes] | None) -> None:
        """Wait for pids to exit, then SIGKILL those that did not within STOP_TIMEOUT_S."""
        deadline = time.monotonic() + self.STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            if child is not None:
                child.poll()
            if not any(_alive(pid) for pid in pids):
                return
            time.sleep(0.1)
        for pid in pids:
            if _alive(pid):
                _kill(pid)

    def _read_state(self) -> dict[str, Any] | None:
        try:
            state: dict[str, Any] = json.loads(self.state_file.read_text(encoding="utf-8"))
            return state
        except (OSError, ValueError):
            return None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self._lock_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_file, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def board_up(device: Device, progress: Progress | None = None,
             baselines: tuple[str, ...] = ()) -> tuple[str, int]:
    """Start the device's emulated board unless it runs; returns the address to connect to.

    `baselines` boots the image that carries those engines; a board already running keeps the
    image it runs (`board down` first to change it).
    """
    return EmulatedBoard.for_device(device, progress, baselines).start()


def board_down(device: Device) -> None:
    EmulatedBoard.for_device(device).stop()


def board_status(device: Device) -> dict[str, Any]:
    return EmulatedBoard.for_device(device).status()


def _names(device_name: str) -> tuple[str, str, str]:
    """The board's hostname, its namespace and the host-side veth (at most 15 characters)."""
    safe = re.sub(r"[^A-Za-z0-9-]", "-", device_name)[:63]
    netns = f"ek-{safe}"
    if len(netns) > 13:
        netns = f"ek-{safe[:5]}-{hashlib.sha1(device_name.encode()).hexdigest()[:4]}"
    return safe, netns, f"{netns}-h"


def _addresses(device: Device) -> tuple[str, str]:
    """The board's address (the inventory's host) and the host side's, the other one of its /30."""
    try:
        board = ipaddress.IPv4Address(device.host)
    except ipaddress.AddressValueError as exc:
        raise InventoryError(f"devices.{device.name}.host is '{device.host}', but an emulated "
                             "board needs an IPv4 address, e.g. 169.254.42.2") from exc
    network = ipaddress.IPv4Network(f"{board}/30", strict=False)
    usable = list(network.hosts())
    if board not in usable or board.is_loopback:
        raise InventoryError(f"devices.{device.name}.host {board} cannot be a board address: use "
                             f"{usable[0]} or {usable[1]} of {network} (e.g. 169.254.42.2)")
    host_side = usable[0] if board == usable[1] else usable[1]
    return str(board), str(host_side)


def _ip(args: list[str]) -> str:
    return run_step(["ip", *args], f"`ip {' '.join(args)}`", None, timeout=30)


def _netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def _start_ticks(pid: int) -> int:
    """When a process started (clock ticks since boot), so a reused pid is not taken for ours."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except OSError:
        return -1
    return int(stat.rpartition(")")[2].split()[19])


def _alive(pid: int, start_ticks: int | None = None) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except OSError:
        return False
    fields = stat.rpartition(")")[2].split()
    if fields[0] in ("Z", "X"):
        return False
    return start_ticks is None or int(fields[19]) == start_ticks


def _cpuinfo() -> str:
    host_cpu = "unknown CPU"
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                host_cpu = value.strip()
                break
    cores = len(os.sched_getaffinity(0))
    return "".join(f"processor\t: {n}\nmodel name\t: qemu-aarch64 on {host_cpu}\n\n"
                   for n in range(cores))


def _cpu_list() -> str:
    """The board's CPUs as sysfs lists them (`0-3`): as many as this process may run on."""
    cores = len(os.sched_getaffinity(0))
    return f"0-{cores - 1}" if cores > 1 else "0"


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no output)"
    return " | ".join(x.strip() for x in text.strip().splitlines()[-lines:]) or "(no output)"
