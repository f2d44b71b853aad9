"""Network namespaces for fault tests: a bridge on the host, daemons behind veth pairs.

    host: ek18-br-<tag> 10.2xx.<n>.1/24
      ├── veth ek18<tag>h<i>  <-->  eth0 10.2xx.<n>.(10+i)/24 in netns ek18-<tag>-<i>
      ...

Each namespace is a board of its own: a daemon listens on its address, the host reaches it over
a link a test can slow down (`tc ... tbf`) or cut (`ip link set down`). Everything made here is
removed by `close()`, which the fixtures call whatever the test did.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["Fleet", "can_make_namespaces"]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def can_make_namespaces() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "`ip netns` is not available"
    return None


class Fleet:
    """`count` namespaces on one bridge; `daemon(i)` starts `edgekit-device serve` in one."""

    def __init__(self, tag: str, subnet: int, count: int, workdir: Path) -> None:
        self.tag, self.count, self.workdir = tag, count, workdir
        self.prefix = f"10.{subnet // 256 + 218}.{subnet % 256}"
        self.bridge = f"ek18br{tag}"
        self.host_ip = f"{self.prefix}.1"
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.ports: dict[int, int] = {}
        self.made: list[str] = []
        self._sweep()
        _ip("link", "add", self.bridge, "type", "bridge")
        self.made.append(f"link:{self.bridge}")
        _ip("addr", "add", f"{self.host_ip}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i in range(count):
            ns, veth = self.netns(i), self.veth(i)
            _ip("netns", "add", ns)
            self.made.append(f"netns:{ns}")
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self.made.append(f"link:{veth}")
            _ip("link", "set", veth, "master", self.bridge)
            _ip("link", "set", veth, "up")
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def _sweep(self) -> None:
        """Remove what a killed earlier run with this tag left (its close() never ran)."""
        for i in range(self.count):
            subprocess.run(["ip", "netns", "del", self.netns(i)], capture_output=True)
            subprocess.run(["ip", "link", "del", self.veth(i)], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    def netns(self, i: int) -> str:
        return f"ek18-{self.tag}-{i}"

    def veth(self, i: int) -> str:
        return f"ek18{self.tag}h{i}"

    def address(self, i: int) -> str:
        return f"{self.prefix}.{10 + i}"

    def daemon(self, i: int, *extra: str, port: int = 9090) -> int:
        """Start a daemon in namespace i on its address; returns its port once it listens."""
        work = self.workdir / f"{self.tag}-{i}"
        work.mkdir(parents=True, exist_ok=True)
        port_file = work / "port"
        port_file.unlink(missing_ok=True)
        log = open(work / "daemon.log", "wb")
        cmd = ["ip", "netns", "exec", self.netns(i), sys.executable, "-m", "devicekit", "serve",
               "--listen", self.address(i), "--port", str(port), "--port-file", str(port_file),
               "--store", str(work / "store"), *extra]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        log.close()
        self.procs[i] = proc
        deadline = time.monotonic() + 120
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon {i} did not start: {self.logs(i)}")
            time.sleep(0.1)
        self.ports[i] = int(port_file.read_text())
        return self.ports[i]

    def logs(self, i: int) -> str:
        return (self.workdir / f"{self.tag}-{i}" / "daemon.log").read_text(errors="replace")

    def signal(self, i: int, signum: int) -> None:
        """Signal daemon i's whole process group (its listener and sessions included)."""
        os.killpg(self.procs[i].pid, signum)

    def link(self, i: int, *args: str) -> None:
        """`ip link set <host side of i> ARGS` (down, up)."""
        _ip("link", "set", self.veth(i), *args)

    def shape(self, i: int, rate: str) -> None:
        """Limit what the host sends to namespace i to `rate` (a token bucket: tbf).

        The queue holds 20 s of traffic, so the link is slow but loses nothing: with a short
        queue tbf drops the tail of a burst, and TCP's retransmit timeout (its RTT inflated by the
        queue) left over a second with nothing acknowledged, which a test's short stall_timeout
        rightly read as a stall (CI failed so once)."""
        subprocess.run(["tc", "qdisc", "replace", "dev", self.veth(i), "root", "tbf", "rate",
                        rate, "burst", "16kb", "latency", "20s"], check=True,
                       capture_output=True, timeout=30)

    def close(self) -> None:
        for i, proc in self.procs.items():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGCONT)
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=30)
        for what in reversed(self.made):
            kind, name = what.split(":", 1)
            args = ["netns", "del", name] if kind == "netns" else ["link", "del", name]
            subprocess.run(["ip", *args], capture_output=True, timeout=30)
        self.made.clear()
