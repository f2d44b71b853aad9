"""`edgekit`'s flags: every command's parser, and the types that check a flag as it is read."""

from __future__ import annotations

import argparse
from pathlib import Path

from hostkit import __version__
from hostkit.cli.terminal import one_line
from hostkit.defaults import CHECK_RTOL, DEFAULT_REPEAT, DEFAULT_WARMUP, INVENTORY_FILE

__all__ = ["parser"]


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"--input-shape expects positive integers like "
                                         f"1,3,224,224, got {text!r}")
    return dims


def _named_shape(text: str) -> tuple[str | None, tuple[int, ...]]:
    """DIMS, or NAME=DIMS for one input of a model with several."""
    name, sep, dims = text.partition("=")
    if sep and name.isidentifier():
        return name, _shape(dims)
    return None, _shape(text)


def _positive(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 12 or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"expected a percentage from 0 to 1000, got {text!r}")
    return value


def _engines(text: str) -> tuple[str, ...]:
    from hostkit.engines import parse_engines

    try:
        return parse_engines(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _count(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 12:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"edgekit: error: {one_line(message)} (see `{self.prog} --help`)\n")


def parser() -> argparse.ArgumentParser:
    """Every command and flag; type checks here, meaning checks in the commands."""
    common = _Parser(add_help=False)
    common.add_argument("--inventory", "-i", type=Path, default=None, metavar="FILE",
                        help=f"inventory file (default: $EDGEKIT_INVENTORY, ./{INVENTORY_FILE}, "
                             "or the built-in local device)")
    common.add_argument("--json", action="store_true", help="print JSON records on stdout")
    common.add_argument("-v", "--verbose", action="store_true", help="log debug messages")

    run = _Parser(add_help=False)
    run.add_argument("--repeat", type=_positive, default=DEFAULT_REPEAT,
                     help=f"timed runs on the device (default {DEFAULT_REPEAT})")
    run.add_argument("--warmup", type=_count, default=DEFAULT_WARMUP,
                     help=f"untimed runs before timing (default {DEFAULT_WARMUP})")
    run.add_argument("--weights", type=Path, default=None, help="a state dict for the model")
    run.add_argument("--input-shape", type=_named_shape, action="append", default=None,
                     metavar="[NAME=]DIMS", help="input shape, e.g. 1,3,224,224; NAME=DIMS per "
                     "input of a saved program with several (repeat)")
    run.add_argument("--input", action="append", default=None, metavar="[NAME=]FILE",
                     help="an image (.jpg, .png: preprocessed as the model's torchvision "
                          "transforms do) or a .npy tensor; NAME=FILE per input of a saved "
                          "program with several (repeat)")
    run.add_argument("--format", choices=["so", "tar"], default=None,
                     help="artifact format: so (linked here) or tar (linked on the board)")
    run.add_argument("--rtol", type=_positive_float, default=CHECK_RTOL,
                     help="largest relative error vs PyTorch (max abs diff over PyTorch's largest "
                          f"output magnitude) that still counts as ok (default {CHECK_RTOL:g})")
    run.add_argument("--perturb", action="store_true",
                     help="self-test of the check: deploy a copy with one weight changed; the "
                          "check against PyTorch must then report failed")
    run.add_argument("--no-tuning", action="store_true", help="ignore tuning records")
    _quant_flags(run)
    run.add_argument("--runtime", choices=["python", "cpp"], default="python",
                     help="cpp: also run the model through the `edgekit export` bundle's C++ "
                          "runner on the device, checked and timed beside the Python daemon")
    run.add_argument("--baselines", type=_engines, default=(), metavar="ENGINES",
                     help="also run the model on the device in these engines (torch, "
                          "onnxruntime; comma-separated), timed like TVM and checked against "
                          "PyTorch; TVM's p50 is shown as a ratio to each")

    parser = _Parser(prog="edgekit", description="Deploy PyTorch models to your own edge boards "
                                                 "with Apache TVM.")
    parser.add_argument("--version", action="version", version=f"edgekit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    dep = sub.add_parser("deploy", parents=[common, run], help="compile, ship, run and check a model")
    dep.add_argument("--device", "-d", required=True, help="device name from the inventory")
    dep.add_argument("model", help="torchvision model name or path to a .pt2 ExportedProgram")
    dep.add_argument("--profile", action="store_true",
                     help="also time every kernel on the device (see `edgekit profile`)")

    prof = sub.add_parser("profile", parents=[common, run],
                          help="deploy, then time every kernel on the device: where the time goes")
    prof.add_argument("--device", "-d", required=True, help="device name from the inventory")
    prof.add_argument("model", help="torchvision model name or path to a .pt2 ExportedProgram")
    prof.add_argument("--runs", type=_positive, default=5, help="inferences profiled (default 5)")
    prof.add_argument("--all", action="store_true", help="every kernel, not only the top 20")
    prof.add_argument("--csv", type=Path, default=None, metavar="FILE", help="every row as CSV")
    prof.add_argument("--html", type=Path, default=None, metavar="FILE",
                      help="also write a self-contained page with the profile as a bar chart")

    bench = sub.add_parser("bench", parents=[common, run], help="benchmark models across devices")
    pick = bench.add_mutually_exclusive_group()
    pick.add_argument("--device", "-d", action="append", default=None, help="repeatable")
    pick.add_argument("--group", "-g", help="every device of an inventory group")
    pick.add_argument("--all-devices", action="store_true", help="every device in the inventory")
    pick.add_argument("--rerun-failed", type=Path, default=None, metavar="RESULTS",
                      help="run again only the (device, model) rows that failed in a results "
                           "file of `bench --json` or `--jsonl`")
    bench.add_argument("models", nargs="*", default=None, help="models (default resnet18)")
    bench.add_argument("--csv", type=Path, default=None, metavar="FILE", help="also write CSV")
    bench.add_argument("--jsonl", type=Path, default=None, metavar="FILE",
                       help="write each result as one JSON line the moment it is final, so an "
                            "interrupted run keeps what it measured")
    bench.add_argument("--html", type=Path, default=None, metavar="FILE",
                       help="also write a self-contained page: the table and latency charts")

    exp = sub.add_parser("export", parents=[common],
                         help="write a bundle that runs the model on the board without Python")
    exp.add_argument("--device", "-d", required=True, help="device name from the inventory")
    exp.add_argument("model", help="torchvision model name or path to a .pt2 ExportedProgram")
    exp.add_argument("-o", "--output", type=Path, required=True, metavar="DIR",
                     help="the bundle folder to write (must not exist, or be empty)")
    exp.add_argument("--archive", action="store_true",
                     help="write DIR.tar.gz instead, byte-for-byte reproducible")
    exp.add_argument("--weights", type=Path, default=None, help="a state dict for the model")
    exp.add_argument("--input-shape", type=_named_shape, action="append", default=None,
                     metavar="[NAME=]DIMS",
                     help="input shape, e.g. 1,3,224,224")
    exp.add_argument("--no-tuning", action="store_true", help="ignore tuning records")
    _quant_flags(exp)

    sub.add_parser("devices", parents=[common], help="list devices and whether they answer")
    sub.add_parser("models", parents=[common], help="list the model names edgekit knows")

    tune = sub.add_parser("tune", parents=[common], help="tune a model on a device (MetaSchedule)")
    tune.add_argument("--device", "-d", required=True)
    tune.add_argument("model")
    tune.add_argument("--trials", type=_positive, default=2000, help="total trials (default 2000)")
    tune.add_argument("--trials-per-task", type=_positive, default=None)
    tune.add_argument("--time-budget", type=_positive_float, default=None, metavar="MINUTES",
                      help="stop starting new trials after this many minutes")
    tune.add_argument("--winograd", action="store_true",
                      help="compute 3x3 stride-1 convolutions as Winograd F(4x4, 3x3); these "
                           "records are kept apart, and a build applies whichever tune "
                           "estimated the faster model")
    tune.add_argument("--weights", type=Path, default=None)
    tune.add_argument("--input-shape", type=_named_shape, action="append", default=None,
                      metavar="[NAME=]DIMS")
    _quant_flags(tune)

    rec = sub.add_parser("records", help="tuning records: list them, move them between hosts")
    actions = rec.add_subparsers(dest="action", required=True, parser_class=_Parser)
    actions.add_parser("list", parents=[common],
                       help="every model's records: target, trials, minutes, best latency")
    rexp = actions.add_parser("export", parents=[common],
                              help="write a model's records on a device's target to one file")
    rexp.add_argument("--device", "-d", required=True)
    rexp.add_argument("model")
    rexp.add_argument("-o", "--output", type=Path, required=True, metavar="FILE")
    rexp.add_argument("--weights", type=Path, default=None)
    rexp.add_argument("--input-shape", type=_named_shape, action="append", default=None,
                      metavar="[NAME=]DIMS")
    _quant_flags(rexp)
    rimp = actions.add_parser("import", parents=[common],
                              help="add exported records to this host's cache (checked first)")
    rimp.add_argument("file", type=Path)
    rimp.add_argument("--device", "-d", default=None,
                      help="refuse the records unless they are for this device's target")

    board = sub.add_parser("board", parents=[common], help="the emulated ARM board (qemu)")
    board.add_argument("action", choices=["up", "down", "status"])
    board.add_argument("--device", "-d", default="pi4-emu")
    board.add_argument("--baselines", type=_engines, default=(), metavar="ENGINES",
                       help="up: boot the image that also carries these engines (onnxruntime; "
                            "built once, beside the lean default image)")

    dev = sub.add_parser("device", parents=[common], help="provision a board over SSH")
    dev.add_argument("action", choices=["install"])
    dev.add_argument("--device", "-d", required=True)
    dev.add_argument("--baselines", type=_engines, nargs="?", const=("torch", "onnxruntime"),
                     default=(), metavar="ENGINES",
                     help="also install baseline engines (default both: torch, onnxruntime), "
                          "from wheels fetched here for the board's platform")
    dev.add_argument("--runtime-only", action="store_true",
                     help="install TVM's runtime only: remove its compiler (~250 MB) from the "
                          "board, which needs none (kernels are compiled on the host)")

    cmp = sub.add_parser("compare", parents=[common],
                         help="regression gate: compare two `bench --json` result files")
    cmp.add_argument("old", type=Path, help="results of the reference run")
    cmp.add_argument("new", type=Path, help="results of the run to judge")
    cmp.add_argument("--max-slowdown", type=_percent, default=10.0, metavar="PERCENT",
                     help="fail when a row's p50 grew by more than this and by more than both "
                          "runs' noise (default 10)")

    doc = sub.add_parser("doctor", parents=[common], help="diagnose a device step by step")
    doc.add_argument("--device", "-d", required=True)
    return parser


def _quant_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantize", choices=["int8"], default=None,
                        help="quantize on the host with calibration; int8 kernels on the device")
    parser.add_argument("--calibration", default="32", metavar="N|DIR",
                        help="calibration: N seeded samples (default 32) or a folder of images")
    parser.add_argument("--calibration-method", choices=["minmax", "entropy"], default="minmax",
                        help="activation ranges: largest magnitude, or KL-divergence threshold")
