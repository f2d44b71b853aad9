"""Baselines beside the TVM run: the same model in PyTorch and ONNX Runtime, on the device itself.

"Is the compiled model worth it on my board?" has an answer only on the board, so the host
exports the model once per engine (the exported program as `.pt2` for PyTorch, ONNX for ONNX
Runtime; cached by the model's identity), sends it into the daemon's store unless it is there,
and the daemon (`devicekit.baselines`) loads it, runs it on the deploy's input and times it with
TVM's protocol (`warmup` runs discarded, then `repeat` runs of one inference each). The outputs
come back and go through the deploy's check against PyTorch (`hostkit.run.check`).

A baseline never fails the row: an engine the device lacks is `n/a`, one that fails (export,
upload, load, run or check) is `failed` with its reason, and TVM's result stands either way.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from hostkit.defaults import cache_dir
from hostkit.errors import EdgekitError, RemoteError, first_line
from hostkit.models import LoadedModel
from hostkit.report.results import Baseline, Latency
from hostkit.run.check import RTOL, compare_outputs

if TYPE_CHECKING:
    from tvm.rpc import RPCSession

__all__ = ["run_baselines", "model_file", "fastest"]

SUFFIX = {"torch": ".pt2", "onnxruntime": ".onnx"}
Note = Callable[[str], None]


def run_baselines(sess: "RPCSession", device: str, model: LoadedModel,
                  reference: list[np.ndarray], engines: Sequence[str], repeat: int, warmup: int,
                  tvm_p50: float | None, rtol: float = RTOL, emulated: bool = False,
                  note: Note | None = None) -> list[Baseline]:
    """Each engine on the device, in order; one Baseline per engine, whatever happens to it."""
    say = note or (lambda _: None)
    results = []
    for engine in engines:
        baseline = Baseline(engine=engine, emulated=emulated)
        try:
            _run_one(sess, device, model, reference, baseline, repeat, warmup, rtol, say)
        except EdgekitError as exc:
            baseline.status, baseline.reason = "failed", exc.message
        except Exception as exc:  # an unmapped failure still ends in this cell alone
            baseline.status, baseline.reason = "failed", f"{type(exc).__name__}: {first_line(exc)}"
        if baseline.status == "ok" and tvm_p50 and baseline.latency_ms:
            baseline.tvm_ratio = tvm_p50 / baseline.latency_ms.p50
        results.append(baseline)
    return results


def fastest(tvm_p50: float | None, baselines: Sequence[Baseline]) -> str | None:
    """The engine with the lowest p50 among TVM and the baselines that matched PyTorch."""
    times = {b.engine: b.latency_ms.p50 for b in baselines
             if b.status == "ok" and b.latency_ms is not None}
    if tvm_p50 is not None:
        times["tvm"] = tvm_p50
    return min(times, key=lambda engine: times[engine]) if times else None


def _run_one(sess: "RPCSession", device: str, model: LoadedModel, reference: list[np.ndarray],
             baseline: Baseline, repeat: int, warmup: int, rtol: float, say: Note) -> None:
    engine = baseline.engine
    say(f"{engine}: is it installed on the device?")
    probe = json.loads(_call(sess, device, "edgekit.baseline_probe", engine))
    baseline.version = probe.get("version")
    if probe["status"] != "ok":
        baseline.status, baseline.reason = probe["status"], probe.get("reason")
        return
    say(f"{engine}: exporting the model (cached when unchanged)")
    path = model_file(model, engine)
    sha256 = _sha256(path)
    if not _call(sess, device, "edgekit.baseline_has", sha256):
        say(f"{engine}: uploading {path.stat().st_size / 1e6:.1f} MB")
        name = f"{sha256}{path.suffix}"
        _upload(sess, device, path, name)
        _call(sess, device, "edgekit.baseline_commit", name, sha256)
    tag = uuid.uuid4().hex[:12]
    inputs_name, outputs_name = f"baseline-in-{tag}.npz", f"baseline-out-{tag}.npz"
    buffer = io.BytesIO()
    np.savez(buffer, *model.inputs)
    _upload(sess, device, bytearray(buffer.getvalue()), inputs_name)
    say(f"{engine}: running on the device ({repeat} runs)")
    raw = json.loads(_call(sess, device, "edgekit.baseline_run", engine, sha256, inputs_name,
                           outputs_name, repeat, warmup, 0))
    baseline.version = raw.get("version", baseline.version)
    if raw["status"] != "ok":
        baseline.status, baseline.reason = raw["status"], raw.get("reason")
        return
    try:
        with np.load(io.BytesIO(bytes(sess.download(outputs_name)))) as archive:
            outputs = [archive[f"arr_{i}"] for i in range(len(archive.files))]
    except Exception as exc:
        raise RemoteError(f"reading {engine}'s outputs from the device failed: {first_line(exc)}",
                          device=device, stage="baseline") from exc
    baseline.threads, baseline.load_s = raw.get("threads"), raw.get("load_s")
    baseline.first_inference_ms = raw.get("first_inference_ms")
    baseline.latency_ms = Latency.from_samples(raw.get("samples_ms") or [])
    check = compare_outputs(outputs, reference, model.family, model.output_names,
                            steps=model.host_steps())
    baseline.max_abs_diff, baseline.rel_err = check.max_abs_diff, check.rel_err
    if not check.passed(rtol):
        baseline.status, baseline.reason = "failed", check.reason(rtol)
        return
    baseline.status = "ok"


def _call(sess: "RPCSession", device: str, name: str, *args: Any) -> Any:
    """A daemon function; a daemon without it is an older devicekit, said in one line."""
    try:
        func = sess.get_function(name)
    except Exception as exc:
        raise RemoteError("the device's daemon has no baseline engines (an older devicekit?)",
                          device=device, stage="baseline",
                          hint=f"install this edgekit there: `edgekit device install --device "
                               f"{device}`") from exc
    try:
        return func(*args)
    except Exception as exc:
        raise RemoteError(f"{name} failed on the device: {first_line(exc)}", device=device,
                          stage="baseline") from exc


def _upload(sess: "RPCSession", device: str, data: Path | bytearray, name: str) -> None:
    """A file, or bytes, into the session's folder on the device."""
    try:
        sess.upload(str(data) if isinstance(data, Path) else data, name)
    except Exception as exc:
        raise RemoteError(f"upload of {name} failed: {first_line(exc)}", device=device,
                          stage="baseline") from exc


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_file(model: LoadedModel, engine: str) -> Path:
    """The model as `engine` loads it, exported once per model identity and kept in the cache."""
    folder = cache_dir() / "baselines"
    key = hashlib.sha256(model.identity.encode()).hexdigest()[:24]
    path = folder / f"{key}{SUFFIX[engine]}"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        if engine == "torch":
            _save_program(model, tmp)
        else:
            _export_onnx(model, tmp)
        os.replace(tmp, path)
    except EdgekitError:
        raise
    except Exception as exc:
        raise RemoteError(f"exporting {model.name} for {engine} failed: {first_line(exc)}",
                          stage="baseline") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _save_program(model: LoadedModel, path: Path) -> None:
    """The exported program TVM imports, saved whole: the device needs no model code to run it."""
    import torch

    with open(path, "wb") as handle:
        torch.export.save(model.exported(), handle)


def _export_onnx(model: LoadedModel, path: Path) -> None:
    """ONNX through torch's TorchScript exporter (the dynamo one needs onnxscript)."""
    import torch

    module = model._module if model._module is not None else model.exported().module()
    args = tuple(torch.from_numpy(x) for x in model.inputs)
    # The exporter prints its graph and warnings; the exception, if any, says what matters.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=17,
                          input_names=[f"input{i}" for i in range(len(args))])
