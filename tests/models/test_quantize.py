"""int8 quantization on the host: calibration, folding, the quantized model, its errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hostkit.errors import ModelError
from hostkit.models import ModelSpec, load_model
from hostkit.models.quantize import _kl_threshold, calibration_samples, quantize_int8


def _tiny() -> object:
    return load_model(ModelSpec("tinycnn", input_shape=(1, 3, 20, 20)))


def test_quantized_model_is_int8_shaped_and_close_to_fp32() -> None:
    model = _tiny()
    samples = calibration_samples("16", model, None)  # type: ignore[arg-type]
    quantized, info = quantize_int8(model, samples, "minmax")  # type: ignore[arg-type]
    assert quantized.precision == "int8" and info.layers == 3 and info.fp32_layers == []
    assert info.int8_mb < info.fp32_mb / 3, "int8 weights are a quarter of fp32's"
    names = {name for name, _ in quantized._module.named_modules()}
    assert not any("BatchNorm" in type(m).__name__ for m in quantized._module.modules()), names
    for name, buffer in quantized._module.named_buffers():
        if name.endswith("weight_int"):
            values = buffer.numpy()
            assert np.all(values == np.round(values)) and np.abs(values).max() <= 127
    fp32, int8 = model.reference()[0], quantized.reference()[0]  # type: ignore[attr-defined]
    assert np.abs(fp32 - int8).max() < 0.1 * np.abs(fp32).max(), "int8 stays near fp32"
    assert quantized.identity != model.identity  # type: ignore[attr-defined]


def test_entropy_clips_outliers_that_minmax_keeps() -> None:
    rng = np.random.default_rng(0)
    values = np.abs(np.concatenate([rng.standard_normal(200_000), [80.0]]))
    threshold = _kl_threshold(values, float(values.max()))
    assert 2.0 < threshold < 20.0, threshold
    model = _tiny()
    samples = calibration_samples("8", model, None)  # type: ignore[arg-type]
    a, _ = quantize_int8(model, samples, "minmax")  # type: ignore[arg-type]
    b, _ = quantize_int8(model, samples, "entropy")  # type: ignore[arg-type]
    assert a.identity != b.identity, "the method is part of the model's identity"


def test_calibration_errors_are_one_line(tmp_path: Path) -> None:
    model = _tiny()
    with pytest.raises(ModelError, match=r"--calibration 0: give 1 to 1024 samples"):
        calibration_samples("0", model, None)  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="not a folder of images nor a sample count"):
        calibration_samples(str(tmp_path / "missing"), model, None)  # type: ignore[arg-type]
    with pytest.raises(ModelError, match=r"no images .* or .npy files in it"):
        calibration_samples(str(tmp_path), model, None)  # type: ignore[arg-type]
    np.save(tmp_path / "a.npy", np.zeros((1, 3, 8, 8), dtype=np.float32))
    with pytest.raises(ModelError, match=r"gives shape \(1, 3, 8, 8\); the model takes "
                                         r"\(1, 3, 20, 20\)"):
        calibration_samples(str(tmp_path), model, None)  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="choose minmax or entropy"):
        quantize_int8(model, [], "kl")  # type: ignore[arg-type]
