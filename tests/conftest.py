"""Shared fixtures: an isolated edgekit cache, real device daemons, inventory files.

Integration tests start real processes (`edgekit-device serve`) on 127.0.0.1 and talk to them
over TVM RPC; nothing here is mocked.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def edgekit_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One cache for the whole session (compiles are shared between tests), never the user's."""
    cache = tmp_path_factory.mktemp("edgekit-cache")
    old = os.environ.get("EDGEKIT_CACHE")
    os.environ["EDGEKIT_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("EDGEKIT_CACHE", None)
    else:
        os.environ["EDGEKIT_CACHE"] = old


class Daemon:
    """A real `edgekit-device serve` process on loopback with its own artifact store."""

    def __init__(self, workdir: Path, extra: list[str] | None = None,
                 env: dict[str, str] | None = None, python: str = sys.executable) -> None:
        self.workdir = workdir
        self.store = workdir / "store"
        port_file = workdir / "port"
        self.log = open(workdir / "daemon.log", "wb")
        cmd = [python, "-m", "devicekit", "serve", "--port", "0", "--port-file",
               str(port_file), "--store", str(self.store), *(extra or [])]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True,
                                     env={**os.environ, **env} if env else None)
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start: {self.logs()}")
            time.sleep(0.1)
        self.port = int(port_file.read_text())

    def logs(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return (self.workdir / "daemon.log").read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("daemon"))
    yield d
    d.stop()


@pytest.fixture
def write_inventory(tmp_path: Path) -> Any:
    """Write an inventory (a dict) to a YAML file and return its path."""

    def write(data: dict[str, Any], name: str = "inventory.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return path

    return write


# The emulated arm64 board (tests/boards/test_emulator.py). Its image (about 1 GiB, minutes to build) is
# kept in the user's cache, taken here before `edgekit_cache` points EDGEKIT_CACHE elsewhere.
def _user_board_images() -> Path:
    from hostkit.boards.image import images_dir

    return images_dir()


USER_BOARD_IMAGES = _user_board_images()


@pytest.fixture(scope="session")
def emulated_board(edgekit_cache: Path) -> Iterator[Any]:
    """The emulated arm64 board's inventory Device; booted once per session, stopped at its end."""
    from hostkit.boards.emulator import board_down, board_up
    from hostkit.boards.image import IMAGES_ENV, host_problems
    from hostkit.inventory import Device

    problems = host_problems()
    if problems:
        pytest.skip(problems[0])
    os.environ.setdefault(IMAGES_ENV, str(USER_BOARD_IMAGES))
    # A short session timeout: a hung session fails the test in minutes, not ten.
    device = Device(name="emu-test", host="169.254.42.5", port=9090, managed="qemu-arm64",
                    emulated=True, format="so", session_timeout=120.0,
                    target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    board_up(device, progress=lambda line: print(line, file=sys.stderr))
    yield device
    board_down(device)


# The build tests' CPU targets, and a tuned build's preparation of a hand-written kernel.
@pytest.fixture(scope="session")
def cpu_targets() -> list[Any]:
    """This machine's CPU, and a generic x86-64 one (16 vector registers, 256-bit vectors: the
    kernels' blocks come out smaller)."""
    import tvm
    from tvm.target import codegen

    return [tvm.target.Target({"kind": "llvm", "mcpu": str(codegen.llvm_get_system_cpu()),
                               "num-cores": 2}),
            tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 2})]


@pytest.fixture
def prepared_kernel(cpu_targets: list[Any]) -> Any:
    """`prepare(mod, name)`: `mod` as a tuned build prepares it for this machine, and the script
    of its one kernel named with `name`, which must come scheduled by hand (threads, vectors)
    and marked so, which keeps MetaSchedule from extracting it as a task."""
    def prepare(mod: Any, name: str) -> tuple[Any, str]:
        from tvm import tirx

        from hostkit.build.tuning.records import prepare_module

        prepared = prepare_module(mod, cpu_targets[0])
        kernels = [f for gv, f in prepared.functions.items()
                   if isinstance(f, tirx.PrimFunc) and name in gv.name_hint]
        assert len(kernels) == 1, [gv.name_hint for gv in prepared.functions]
        script = kernels[0].script()
        assert kernels[0].attrs["tirx.is_scheduled"]
        assert "T.parallel" in script and "T.vectorized" in script
        return prepared, script

    return prepare
