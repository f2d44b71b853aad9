"""A daemon that answers RPC but not as edgekit's does: one line, not a JSON traceback."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from hostkit.cli import main

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def _serving(script: str, tmp_path: Path) -> Iterator[int]:
    """Run `script` (a TVM RPC server writing its port to argv[1]); yield the port."""
    port_file = tmp_path / "port"
    proc = subprocess.Popen([sys.executable, "-c", script, str(port_file)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        yield int(port_file.read_text())
    finally:
        proc.kill()
        proc.wait()

FOREIGN = """
import random, sys
from tvm import rpc

def register():
    import tvm_ffi
    tvm_ffi.register_global_func("edgekit.device_info", lambda: "hello from another tool")

start = random.randrange(20000, 60000)
server = rpc.Server("127.0.0.1", port=start, port_end=start + 500,
                    server_init_callback=register)
open(sys.argv[1], "w").write(str(server.port))
server.proc.join()
"""

def test_foreign_daemon_is_named(tmp_path: Path, write_inventory: Any,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    with _serving(FOREIGN, tmp_path) as port:
        inv = write_inventory({"devices": {"dev": {"target": {"kind": "llvm"},
                                                   "host": "127.0.0.1",
                                                   "port": port}}})
        assert main(["deploy", "-i", str(inv), "-d", "dev", "tinycnn"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("edgekit: error: dev: 127.0.0.1:")
        assert "answered edgekit.device_info with 'hello from another tool', not an edgekit " \
               "device report" in err[-1]


OLD_TVM = FOREIGN.replace('lambda: "hello from another tool"',
                          """lambda: '{"tvm_version": "0.19.0", "arch": "aarch64"}'""")


def test_devices_exits_1_for_a_daemon_with_another_tvm(tmp_path: Path, write_inventory: Any,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    with _serving(OLD_TVM, tmp_path) as port:
        inv = write_inventory({"devices": {"old": {"target": {"kind": "llvm"},
                                                   "port": port}}})
        assert main(["devices", "-i", str(inv)]) == 1
        captured = capsys.readouterr()
        assert "wrong TVM" in captured.out and "TVM 0.19.0" in captured.out
        assert captured.err.strip() == ("edgekit: error: 1 of 1 devices did not answer as they "
                                        "should (unreachable, silent or another TVM): old")
