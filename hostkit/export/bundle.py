"""`edgekit export`: one folder (or one reproducible .tar.gz) that runs a model on a board alone.

The bundle holds the compiled model for the device's target (tuning records applied when they
exist), TVM's runtime for the device's architecture, the C++ runner as source and binary, a sample
input with PyTorch's outputs for it, `inputs.txt` (what the runner feeds), `manifest.json` and a
README. Everything is checked before minutes of compiling start (target, compilers, the output
path) and written into a temporary folder beside the output that is renamed into place at the
end, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shlex
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from devicekit.store import file_sha256
from hostkit import __version__
from hostkit.build.compiler import build_artifact
from hostkit.build.targets import ResolvedTarget, check_cross_compiler, resolve_target
from hostkit.build.tuning.records import records_for
from hostkit.errors import EdgekitError, ExportError
from hostkit.export.runner import (
    RUNNER_NAME,
    build_command,
    build_runner,
    compiler_version,
    cxx_for,
)
from hostkit.export.runtime import (
    RUNTIME_LIBS,
    Runtime,
    check_runtime_exists,
    runtime_for,
    tvm_versions,
)
from hostkit.inventory import Device
from hostkit.models import LoadedModel, ModelSpec, load_model, preprocessing_for

__all__ = ["Bundle", "export_bundle", "write_archive", "BUNDLE_FORMAT", "RUNNER_DTYPES"]

BUNDLE_FORMAT = "edgekit-bundle/1"
# The dtypes runner.cc reads and writes (its kTypes table).
RUNNER_DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")
ARCHIVE_SUFFIX = ".tar.gz"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Bundle:
    """What an export wrote: the folder or archive, and the manifest inside it."""

    path: Path
    archive: bool
    manifest: dict[str, Any]
    files: dict[str, int] = field(default_factory=dict)  # bundle-relative name -> bytes
    sha256: str | None = None  # of the archive

    @property
    def size(self) -> int:
        return self.path.stat().st_size if self.archive else sum(self.files.values())

    @property
    def command(self) -> str:
        return str(self.manifest["run"])


def export_bundle(device: Device, model: ModelSpec | LoadedModel, out: Path, *,
                  archive: bool = False, use_tuning: bool = True,
                  progress: Progress | None = None) -> Bundle:
    """Write the bundle for `model` on `device` to `out` (with archive: `out` + .tar.gz).

    A ModelSpec is loaded only after the checks that take no time have passed.
    """
    say = progress or (lambda _line: None)
    final = _final_path(out, archive)
    device = device.with_overrides(format="so")  # the runner loads a linked library
    say("resolving target and compilers")
    resolved = resolve_target(device)
    if resolved.kind != "llvm":
        raise ExportError(f"the runner runs models on the CPU, but {device.name}'s target is "
                          f"{resolved.kind}", device=device.name, stage="target",
                          hint="export for a device with an llvm target")
    check_runtime_exists(resolved.arch, device.name)
    c_compiler = check_cross_compiler(device, resolved, tar_fallback=False)
    cxx = cxx_for(device, resolved, c_compiler)
    _check_output(final, device.name)
    staging = _staging(final, device.name)
    try:
        folder = staging / _bundle_name(final)
        folder.mkdir()
        say(f"TVM runtime for {resolved.arch}")
        runtime = runtime_for(resolved.arch, device.name)
        for lib in runtime.libs:
            shutil.copyfile(lib, folder / lib.name)
            os.chmod(folder / lib.name, 0o755)
        if isinstance(model, ModelSpec):
            say(f"loading {model.name}")
            model = load_model(model)
        _check_feedable(model, device.name)
        say("compiling the model (cached when unchanged)")
        tuning = records_for(model, resolved) if use_tuning else None
        artifact = build_artifact(model, resolved, fmt="so", cross_compiler=c_compiler,
                                  tuning=tuning, device=device.name)
        shutil.copyfile(artifact.path, folder / "model.so")
        say(f"building the runner with {cxx}")
        build_runner(folder, cxx, runtime, device.name)
        reference = _write_sample(folder, model)
        manifest = _manifest(device, resolved, model, reference, runtime, cxx, artifact)
        (folder / "README.md").write_text(_readme(manifest), encoding="utf-8")
        manifest["files"] = {name: file_sha256(folder / name) for name in _files(folder)}
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True)
                                              + "\n", encoding="utf-8")
        files = {name: (folder / name).stat().st_size
                 for name in [*_files(folder), "manifest.json"]}
        if archive:
            say("packing the archive")
            packed = staging / final.name
            write_archive(folder, packed)
            sha = file_sha256(packed)
            os.replace(packed, final)
            return Bundle(path=final, archive=True, manifest=manifest, files=files, sha256=sha)
        os.replace(folder, final)  # rename(2) also replaces an empty folder the user made
        return Bundle(path=final, archive=False, manifest=manifest, files=files)
    except EdgekitError:
        raise
    except OSError as exc:
        raise ExportError(f"writing the bundle failed: {exc}", device=device.name,
                          stage="write") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _final_path(out: Path, archive: bool) -> Path:
    out = Path(out)
    if archive and not out.name.endswith(ARCHIVE_SUFFIX):
        return out.with_name(out.name + ARCHIVE_SUFFIX)
    return out


def _bundle_name(final: Path) -> str:
    """The folder's name, also the archive's top folder: dist/x.tar.gz unpacks to x/."""
    name = final.name
    return name[: -len(ARCHIVE_SUFFIX)] if name.endswith(ARCHIVE_SUFFIX) else name


def _check_output(final: Path, device: str) -> None:
    if final.is_dir() and any(final.iterdir()):
        raise ExportError(f"{final} already exists and is not empty", device=device,
                          stage="write", hint="remove it or choose another -o")
    if final.exists() and not final.is_dir():
        raise ExportError(f"{final} already exists", device=device, stage="write",
                          hint="remove it or choose another -o")


def _staging(final: Path, device: str) -> Path:
    """A temporary folder beside the output (same filesystem, so the last step is a rename)."""
    parent = final.absolute().parent
    blocking = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise ExportError(f"cannot write the bundle under {parent}: {blocking} is a file",
                          device=device, stage="write", hint="choose another -o")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=parent))
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ExportError(f"cannot write the bundle under {parent}: {reason}", device=device,
                          stage="write", hint="choose another -o") from exc


def _check_feedable(model: LoadedModel, device: str) -> None:
    for i, array in enumerate(model.inputs):
        if str(array.dtype) not in RUNNER_DTYPES:
            raise ExportError(f"the runner cannot feed {model.name}: input {i} is {array.dtype}, "
                              f"and it reads {', '.join(RUNNER_DTYPES)}", device=device,
                              stage="model")


def _write_sample(folder: Path, model: LoadedModel) -> list[np.ndarray]:
    """The model's fixed input and PyTorch's outputs for it, so the board can check itself."""
    sample = folder / "sample"
    sample.mkdir()
    reference = model.reference()
    for i, array in enumerate(model.inputs):
        np.save(sample / f"input{i}.npy", array)
    for i, array in enumerate(reference):
        np.save(sample / f"expected{i}.npy", array)
    names, _ = model.io_names()
    lines = ["# name dtype shape: one input file per line of this list, in this order"]
    for name, array in zip(names, model.inputs):
        dims = ",".join(str(d) for d in array.shape) or "scalar"
        lines.append(f"{name} {array.dtype} {dims}")
    (folder / "inputs.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return reference


def _tensors(names: list[str], arrays: list[np.ndarray]) -> list[dict[str, Any]]:
    return [{"name": name, "dtype": str(a.dtype), "shape": list(a.shape)}
            for name, a in zip(names, arrays)]


def _manifest(device: Device, resolved: ResolvedTarget, model: LoadedModel,
              reference: list[np.ndarray], runtime: Runtime, cxx: str,
              artifact: Any) -> dict[str, Any]:
    in_names, out_names = model.io_names()
    if len(out_names) != len(reference):  # a nested output: number them as the runner does
        out_names = [f"output{i}" for i in range(len(reference))]
    inputs = " ".join(f"sample/input{i}.npy" for i in range(len(model.inputs)))
    return {
        "format": BUNDLE_FORMAT,
        "model": {"name": model.name, "identity": model.identity,
                  "inputs": _tensors(in_names, model.inputs),
                  "outputs": _tensors(out_names, reference),
                  "preprocessing": preprocessing_for(model.name)},
        "device": device.name,
        "arch": resolved.arch,
        "target": resolved.to_json(),
        "target_description": resolved.describe() if resolved.triple
        else f"{resolved.describe()} ({resolved.arch}, this machine's CPU)",
        "tvm": tvm_versions(),
        "runtime": {"libs": list(RUNTIME_LIBS), "from": runtime.source},
        "artifact_sha256": artifact.sha256,
        "tuned": artifact.tuned,
        "records": artifact.records,
        "tuned_kernels": artifact.tuned_kernels,
        "runner": {"binary": RUNNER_NAME, "source": "runner.cc", "compiler": cxx,
                   "compiler_version": compiler_version(cxx)},
        "edgekit": __version__,
        "run": f"./{RUNNER_NAME} {inputs} --out .",
    }


def _readme(manifest: dict[str, Any]) -> str:
    model = manifest["model"]
    ins = ", ".join(f"`{t['name']}` {t['dtype']} {t['shape']}" for t in model["inputs"])
    outs = ", ".join(f"`{t['name']}` {t['dtype']} {t['shape']}" for t in model["outputs"])
    tvm = manifest["tvm"]["apache-tvm"]
    cmd = shlex.join(build_command(manifest["runner"]["compiler"], "TVM_FFI_INCLUDE"))
    return f"""# {model['name']} for {manifest['device']} ({manifest['arch']})

Made by `edgekit export`. It runs with TVM's C++ runtime alone: no Python, no TVM install.

```sh
{manifest['run']}
```

runs the model once on the sample input and writes `output0.npy`, ...; compare them with
`sample/expected*.npy` (PyTorch's outputs). Add `--repeat 100` for latency percentiles.
Give your own inputs as `.npy` files (or raw files of exactly the input's bytes), one per line of
`inputs.txt`: {ins}. Outputs: {outs}. Preprocessing: `manifest.json` (`model.preprocessing`).

| file | what |
|---|---|
| `model.so` | the model compiled for {manifest['target_description']} |
| `libtvm_runtime.so`, `libtvm_ffi.so` | TVM {tvm}'s runtime for {manifest['arch']} |
| `{manifest['runner']['binary']}`, `runner.cc` | the runner and its source: an example to copy |
| `manifest.json` | model, shapes, target, versions, and the sha256 of every file |

Rebuild the runner (TVM_FFI_INCLUDE is the `tvm_ffi/include` folder of the apache-tvm-ffi wheel):

```sh
{cmd}
```
"""


def _files(folder: Path) -> list[str]:
    """Every file in the bundle but the manifest, as sorted bundle-relative paths."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and p.name != "manifest.json")


def write_archive(folder: Path, archive: Path) -> None:
    """A .tar.gz of folder that depends only on the files' names and bytes: entries sorted,
    times zero, owner root, modes 755 or 644, no file name or time in the gzip header."""
    def normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        info.mode = 0o755 if info.isdir() or info.mode & 0o100 else 0o644
        return info

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        entries = [folder, *sorted(folder.rglob("*"))]
        for path in entries:
            name = str(Path(folder.name) / path.relative_to(folder)) if path != folder \
                else folder.name
            tar.add(path, arcname=name, recursive=False, filter=normalise)
    with open(archive, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
            gz.write(buffer.getvalue())
