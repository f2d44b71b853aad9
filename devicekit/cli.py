"""`edgekit-device`: start the daemon on a board, print what it reports, or run a tracker."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from devicekit import __version__
from devicekit.info import compute_threads
from devicekit.server import DEFAULT_BIND, DEFAULT_PORT, EXPOSED_WARNING, configure_logging, serve

__all__ = ["main"]

DEFAULT_TRACKER_PORT = 9190


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgekit-device", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edgekit-device {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    srv = sub.add_parser("serve", help="run the RPC daemon until SIGTERM")
    srv.add_argument("--listen", default=DEFAULT_BIND, metavar="ADDR",
                     help=f"address to bind (default {DEFAULT_BIND}; anything else is exposed)")
    srv.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    srv.add_argument("--port-end", type=int, default=None,
                     help="try ports up to this one (exclusive) when --port is taken")
    srv.add_argument("--tracker", type=_host_port, metavar="HOST:PORT",
                     help="register with a TVM RPC tracker")
    srv.add_argument("--key", default="", help="device key announced to the tracker")
    srv.add_argument("--store", type=Path, default=None, metavar="DIR",
                     help="where deployed artifacts are kept (default ~/.cache/edgekit-device)")
    srv.add_argument("--port-file", type=Path, default=None, metavar="FILE",
                     help="write the bound port here once the daemon accepts connections")

    srv.add_argument("--exit-with-parent", action="store_true",
                     help="stop when the process that started this daemon exits, even if it "
                          "was killed (edgekit uses this for the daemons it starts itself)")
    srv.add_argument("--runtime-only", action="store_true",
                     help="run on TVM's runtime alone, without its compiler (TVM_USE_RUNTIME_LIB)")

    sub.add_parser("info", help="print what this device reports to the host, as JSON")

    strip = sub.add_parser("strip-compiler",
                           help="make this TVM runtime-only: remove libtvm_compiler.so (~250 MB); "
                                "print the environment's size before and after, as JSON")
    strip.add_argument("--dry-run", action="store_true", help="measure only, remove nothing")

    trk = sub.add_parser("tracker", help="run a TVM RPC tracker that daemons register with")
    trk.add_argument("--listen", default=DEFAULT_BIND, metavar="ADDR")
    trk.add_argument("--port", type=int, default=DEFAULT_TRACKER_PORT)
    return parser


def _run_tracker(host: str, port: int) -> int:
    try:
        from tvm.rpc.tracker import Tracker
    except ImportError as exc:
        print(f"edgekit-device: the tracker needs tornado: pip install 'edgekit[tracker]' ({exc})",
              file=sys.stderr)
        return 1

    if host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("edgekit-device").warning(EXPOSED_WARNING.format(addr=f"{host}:{port}"))
    tracker = Tracker(host, port=port, port_end=port + 1, silent=True)
    logging.getLogger("edgekit-device").info("tracker listening on %s:%d", host, tracker.port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    tracker.terminate()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.verbose)
    # tvm_ffi imports torch when it can and asks it about CUDA, which initialises CUDA in the
    # daemon; every RPC session is a fork of it, and a fork cannot use a CUDA context its parent
    # made (cudaErrorInitializationError). The device side never needs torch's DLPack bridge.
    os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
    # tvm_ffi imports torch eagerly when it is installed (a host with a device daemon on it):
    # about 400 MB per daemon process for nothing, which a fleet of daemons on one machine, or a
    # board with little memory, cannot spare. None in sys.modules makes that import fail fast.
    sys.modules.setdefault("torch", None)  # type: ignore[arg-type]
    # TVM reads this when a session first runs a parallel kernel; its own default on x86 is half
    # the CPUs (it assumes hyper-threads), which on a core without them leaves half idle.
    os.environ.setdefault("TVM_NUM_THREADS", str(compute_threads()))
    if getattr(args, "runtime_only", False):
        os.environ["TVM_USE_RUNTIME_LIB"] = "1"  # read when TVM is first imported, below
    if args.command == "strip-compiler":
        from devicekit.runtime import strip_compiler

        try:
            json.dump(strip_compiler(args.dry_run), sys.stdout, indent=2)
        except OSError as exc:
            print(f"edgekit-device: cannot strip TVM's compiler: {exc}", file=sys.stderr)
            return 1
        print()
        return 0
    if args.command == "info":
        from devicekit.info import device_info

        json.dump(device_info(), sys.stdout, indent=2)
        print()
        return 0
    if args.command == "tracker":
        return _run_tracker(args.listen, args.port)
    if args.key and not args.tracker:
        print("edgekit-device: --key is only used with --tracker HOST:PORT", file=sys.stderr)
        return 2
    try:
        return serve(args.listen, args.port, args.port_end, args.tracker, args.key, args.store,
                     args.port_file, exit_with_parent=args.exit_with_parent)
    except (OSError, ValueError) as exc:
        print(f"edgekit-device: cannot serve on {args.listen}:{args.port}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
