"""The device daemon: TVM's RPC server plus edgekit's device functions.

TVM's `rpc.Server` runs its listener in a worker process and forks one process per session. That
worker outlives its parent if the parent dies without cleaning up, so the init callback below also
starts a watchdog that ends the worker (and any session) once the daemon process is gone.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

__all__ = ["serve", "DEFAULT_BIND", "DEFAULT_PORT", "EXPOSED_WARNING"]

log = logging.getLogger("edgekit-device")

DEFAULT_BIND = "127.0.0.1"
DEFAULT_PORT = 9090
EXPOSED_WARNING = (
    "listening on {addr}: TVM's RPC server grants remote code execution to anyone who can reach "
    "this port; expose it only on a trusted network, or use edgekit's ssh transport instead"
)


def _register_functions(store_dir: str, daemon_pid: int) -> None:
    """Runs inside TVM's server worker: registers the `edgekit.*` functions the host calls."""
    import tvm_ffi

    from devicekit.info import device_info, process_memory
    from devicekit.store import ArtifactStore, StoreError

    store = ArtifactStore(Path(store_dir))
    # Baseline engines' model files (devicekit.baselines), kept apart from TVM's libraries.
    baseline_store = ArtifactStore(Path(store_dir) / "baselines", keep=8,
                                   formats=(".pt2", ".onnx"))

    def workpath(name: str) -> Path:
        return Path(tvm_ffi.get_global_func("tvm.rpc.server.workpath")(name))

    def link(tar: Path, output: Path) -> None:
        from tvm.support import cc, utils
        from tvm.support import tar as tar_util

        tmp = utils.tempdir()
        tar_util.untar(str(tar), tmp.temp_dir)
        cc.create_shared(str(output), [tmp.relpath(x) for x in tmp.listdir()])

    @tvm_ffi.register_global_func("edgekit.use_device", override=True)
    def _use_device(kind: str) -> None:
        """Before the host loads a library built for `kind`: load TVM's runtime for it (a
        runtime-only TVM loads none by itself), or say in one line why this device cannot."""
        from devicekit.runtime import load_device_runtime

        problem = load_device_runtime(kind)
        if problem:
            raise RuntimeError(f"edgekit: {problem}")

    @tvm_ffi.register_global_func("edgekit.device_info", override=True)
    def _info() -> str:
        return json.dumps(device_info())

    kernel_times: dict[str, list] = {}  # symbol -> [each call's seconds, argument shapes]
    started: list[float] = []

    @tvm_ffi.register_global_func("edgekit.profile_instrument", override=True)
    def _instrument(_func: object, symbol: str, before: bool, _ret: object, *args: object) -> int:
        """The Relax VM calls this around every call it makes: time each kernel on the device."""
        if before:
            started.append(time.perf_counter())
            return 0
        elapsed = time.perf_counter() - started.pop()
        entry = kernel_times.get(symbol)
        if entry is None:
            shapes = [list(getattr(a, "shape", ())) for a in args]
            entry = kernel_times[symbol] = [[], shapes]
        entry[0].append(elapsed)
        return 0

    @tvm_ffi.register_global_func("edgekit.profile_attach", override=True)
    def _attach(vm_module: object) -> None:
        """Put the instrument on a VM the host loaded in this session (a function cannot travel
        over RPC, the VM's module can)."""
        vm_module["set_instrument"](  # type: ignore[index]
            tvm_ffi.get_global_func("edgekit.profile_instrument"))

    @tvm_ffi.register_global_func("edgekit.profile_take", override=True)
    def _take() -> str:
        """The kernel times gathered since the last call, as JSON; the record starts anew."""
        report = {k: {"calls": len(v[0]), "seconds": sum(v[0]), "each": v[0], "shapes": v[1]}
                  for k, v in kernel_times.items()}
        kernel_times.clear()
        return json.dumps(report)

    @tvm_ffi.register_global_func("edgekit.memory", override=True)
    def _memory() -> str:
        """This session's resident memory and its peak (each session is a process of its own)."""
        return json.dumps(process_memory())

    @tvm_ffi.register_global_func("edgekit.artifact_has", override=True)
    def _has(sha256: str) -> bool:
        return store.find(sha256) is not None

    @tvm_ffi.register_global_func("edgekit.artifact_commit", override=True)
    def _commit(upload_name: str, sha256: str) -> str:
        return str(store.commit(workpath(upload_name), sha256))

    @tvm_ffi.register_global_func("edgekit.artifact_path", override=True)
    def _path(sha256: str) -> str:
        """The loadable library of an artifact (linked here if it came as a .tar).

        The host passes it to `RPCSession.load_module`, which accepts an absolute path.
        """
        try:
            return str(store.library_path(sha256, link))
        except StoreError as exc:
            raise RuntimeError(f"edgekit: {exc}") from exc

    @tvm_ffi.register_global_func("edgekit.baseline_probe", override=True)
    def _baseline_probe(engine: str) -> str:
        """Whether this device has a baseline engine (imported here, in the session process)."""
        from devicekit import baselines

        return json.dumps(baselines.probe(engine))

    @tvm_ffi.register_global_func("edgekit.baseline_has", override=True)
    def _baseline_has(sha256: str) -> bool:
        return baseline_store.find(sha256) is not None

    @tvm_ffi.register_global_func("edgekit.baseline_commit", override=True)
    def _baseline_commit(upload_name: str, sha256: str) -> str:
        return str(baseline_store.commit(workpath(upload_name), sha256))

    @tvm_ffi.register_global_func("edgekit.baseline_run", override=True)
    def _baseline_run(engine: str, sha256: str, inputs_name: str, outputs_name: str,
                      repeat: int, warmup: int, threads: int) -> str:
        """Run and time a stored baseline model; its outputs land in the session's workpath for
        the host to download. Failures come back as JSON, never as an exception."""
        from devicekit import baselines

        model = baseline_store.find(sha256)
        if model is None:
            return json.dumps({"engine": engine, "status": "failed",
                               "reason": f"model {sha256[:12]} is not on this device"})
        os.utime(model)
        return json.dumps(baselines.run(engine, model, workpath(inputs_name),
                                        workpath(outputs_name), repeat, warmup, threads))

    watchdog = threading.Thread(target=_exit_with_daemon, args=(daemon_pid,), daemon=True)
    watchdog.start()
    _survive_dead_sessions()


def _survive_dead_sessions() -> None:
    """Keep serving after a session process dies (the kernel's OOM killer, a crash in a kernel).

    TVM's listener raises when a session exits non-zero, which ends the listening thread: the
    daemon would answer no one again. This logs one line the host can show instead, and goes on.
    """
    import tvm.rpc.server as tvm_server

    original = tvm_server._serving

    def serving(sock: object, addr: object, opts: object, load_library: object) -> None:
        cwd = os.getcwd()  # TVM leaves the dead session's (removed) folder as the cwd
        try:
            original(sock, addr, opts, load_library)
        except Exception as exc:
            os.chdir(cwd)
            code = str(exc).rsplit(" ", 1)[-1]
            killed = code.lstrip("-").isdigit() and int(code) < 0
            why = (f"killed by signal {-int(code)} (out of memory? see `dmesg | grep -i oom`)"
                   if killed else f"failed: {exc}")
            log.error("the session from %s ended abnormally: %s", addr, why)
            try:
                sock.close()  # type: ignore[attr-defined]
            except OSError:
                pass

    tvm_server._serving = serving


def _exit_with_daemon(daemon_pid: int) -> None:
    while True:
        time.sleep(0.5)
        try:
            os.kill(daemon_pid, 0)
        except ProcessLookupError:
            _kill_children()
            os._exit(0)


def _kill_children() -> None:
    try:
        import psutil
    except ImportError:
        return
    for child in psutil.Process().children(recursive=True):
        child.kill()


def serve(
    host: str = DEFAULT_BIND,
    port: int = DEFAULT_PORT,
    port_end: int | None = None,
    tracker: tuple[str, int] | None = None,
    key: str = "",
    store_dir: Path | None = None,
    port_file: Path | None = None,
    exit_with_parent: bool = False,
) -> int:
    """Serve until SIGTERM or SIGINT; returns the process exit code.

    `exit_with_parent`: also stop once the process that started this one is gone. A daemon in a
    session of its own outlives a parent killed with SIGKILL, which sends it no signal; the kernel
    then gives it a new parent, which is what is watched for.
    """
    from tvm import rpc

    from devicekit.store import default_store_dir

    parent = os.getppid()

    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(EXPOSED_WARNING.format(addr=f"{host}:{port}"))
    # Absolute: every RPC session runs in a temporary folder of its own.
    store_dir = (store_dir or default_store_dir()).resolve()
    if port == 0:
        # TVM's server cannot bind port 0 (it treats the port as unset); scan from a random base.
        port = random.randrange(20000, 60000)
        port_end = port + 500
    init = functools.partial(_register_functions, str(store_dir), os.getpid())
    server = rpc.Server(
        host=host,
        port=port,
        port_end=port_end or port + 1,
        tracker_addr=tracker,
        key=key,
        server_init_callback=init,
    )
    log.info("edgekit-device serving on %s:%d (artifacts in %s)", host, server.port, store_dir)
    if tracker:
        log.info("registered with tracker %s:%d as key %r", tracker[0], tracker[1], key)
    if port_file:
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(f"{server.port}\n", encoding="utf-8")
        os.replace(tmp, port_file)

    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    while not stop.wait(0.5):
        if server.proc is None or not server.proc.is_alive():
            log.error("the RPC server process died; stopping")
            return 1
        if exit_with_parent and os.getppid() != parent:
            log.info("the process that started this daemon (pid %d) exited; stopping", parent)
            break
    server.terminate()
    log.info("stopped")
    return 0


def configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
