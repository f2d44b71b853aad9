"""A seeded R-CNN's box regressors come out at the spread of the targets they would learn.

The RPN's deltas (box coder weights 1) at Fast R-CNN's target spread (0.1, 0.1, 0.2, 0.2), not
the unit spread `live_init` gives every layer (at which float32 rounding alone moved
fasterrcnn_resnet50_fpn_v2's scores by 2e-3); the RoI heads' (coder weights 10, 10, 5, 5) as
`live_init` left them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hostkit.models import ModelSpec, load_model
from hostkit.models.detection import TARGET_SPREAD


def _spread(model: Any, layer: Any) -> np.ndarray:
    """The spread of `layer`'s outputs per coordinate (dx, dy, dw, dh) on the model's input."""
    import torch

    seen: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda _layer, _inputs, out: seen.append(out))
    try:
        with torch.no_grad():
            model._module(torch.from_numpy(model.inputs[0]))
    finally:
        hook.remove()
    out = seen[0]
    if out.dim() == 4:  # the RPN's convolution: anchors x 4 channels, coordinates fastest
        out = out.permute(0, 2, 3, 1)
    return out.reshape(-1, 4).std(0).numpy()


def test_rpn_deltas_have_the_targets_spread_and_roi_heads_unit_spread(monkeypatch: Any) -> None:
    """The same seeded model built with and without `seeded_regression`: the RPN's deltas
    scaled by exactly the targets' spread, from above 1 to below 0.5; the RoI heads' kept."""
    from hostkit.models import zoo

    spec = ModelSpec("fasterrcnn_mobilenet_v3_large_320_fpn", input_shape=(1, 3, 128, 128))
    scaled = load_model(spec)
    monkeypatch.setattr(zoo, "seeded_regression", lambda module: None)
    unit = load_model(spec)
    assert scaled.identity != unit.identity  # other weights, another cached artifact

    def both(layer: str) -> tuple[np.ndarray, np.ndarray]:
        return tuple(_spread(m, m._module.get_submodule(layer))  # type: ignore[return-value]
                     for m in (scaled, unit))

    rpn, rpn_unit = both("rpn.head.bbox_pred")
    np.testing.assert_allclose(rpn / rpn_unit, TARGET_SPREAD, rtol=1e-4)
    assert rpn.max() < 0.5 < rpn_unit.min()
    # The RoI heads' layer keeps its weights (its inputs, pooled at other proposals, do not).
    heads = [m._module.roi_heads.box_predictor.bbox_pred.state_dict() for m in (scaled, unit)]
    assert all(heads[0][k].equal(heads[1][k]) for k in heads[0])
