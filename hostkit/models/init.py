"""Seeded weights whose outputs carry signal: a data-dependent initialisation.

torchvision's random initialisation leaves several models' outputs dead by the last layer
(MobileNetV2's logits near 1e-15 in eval mode, where batch norm uses its initial statistics), and a
comparison of near-zero numbers passes whatever a device computes. So a seeded model is initialised
from data, in one forward pass on seeded inputs (`INIT_METHOD` names the method in the model's
identity):

- every convolution and linear layer is rescaled, in the order the forward pass reaches it, so its
  output has unit standard deviation (a layer initialised to zeros, like ViT's head, is first drawn
  from a normal distribution, or it would pass on nothing) (LSUV, Mishkin & Matas 2016, in a single pass: each hook
  rescales the layer's weights and the output it passes on by the same factor);
- every batch norm takes its running statistics from that pass (cumulative, momentum None).

Afterwards each layer's activations have a spread of order one and so do the logits. User weights
are never touched. A seeded R-CNN's box regressors are then scaled to their targets' spread
(`hostkit.models.detection.seeded_regression`): unit spread is wrong for deltas that are
exponentiated.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["INIT_METHOD", "live_init"]

INIT_METHOD = "lsuv-bn-1"
# Samples in the initialising pass: enough for batch statistics of the last, smallest feature maps.
BATCH = 4


def live_init(module: "torch.nn.Module", shape: tuple[int, ...], seed: int) -> None:
    """Rescale `module`'s layers and set its batch-norm statistics from one seeded forward pass."""
    import torch
    from torch import nn

    sample = np.random.default_rng(seed + 1).standard_normal((BATCH, *shape[1:]), dtype=np.float32)
    rescaled: set[int] = set()

    def rescale(layer: Any, inputs: Any, output: Any) -> Any:
        if id(layer) in rescaled or not isinstance(output, torch.Tensor):
            return None  # a layer called twice was rescaled at its first call
        rescaled.add(id(layer))
        if not layer.weight.any():  # a zero-initialised head (ViT's) would output only its bias
            nn.init.normal_(layer.weight, std=layer.weight[0].numel() ** -0.5)
            output = layer.forward(*inputs)
        std = float(output.float().std())
        if not math.isfinite(std) or std < 1e-12:
            return None
        layer.weight.div_(std)
        if layer.bias is not None:
            layer.bias.div_(std)
        return output / std

    layers = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)
    hooks = [m.register_forward_hook(rescale) for m in module.modules() if isinstance(m, layers)]
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in norms]
    module.eval()  # dropout and stochastic depth off; only the batch norms learn
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    try:
        with torch.no_grad():
            module(torch.from_numpy(sample))
    finally:
        for hook in hooks:
            hook.remove()
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
        module.eval()
