"""Neuron importance s_j of a level's output neurons (2507.00037 §3.2, step 3).

A neuron is a channel of a B×C×H×W output or a feature of a B×d / B×T×d output. The score is
the mean |attribution| of the neuron over the fusion set and its positions, attributed to the
target class (``labels``, else the model's own prediction), normalised to sum 1 per level and
parent; ``uniform`` gives every neuron 1/n. Methods (Captum): ``conductance``
(LayerConductance, trapezoid rule), ``deeplift`` (LayerDeepLift, zero baseline), ``ablation``
(as Captum's LayerFeatureAblation with one group per neuron, computed directly: the drop of the
target logit when the neuron is set to 0 at every position).

DeepLift caveat: Captum applies its rescale rule only to activation *modules* used once
(``nn.ReLU``...); functional calls (``F.relu`` in a ResNet ``BasicBlock``) and unsupported
modules (``GELU``) fall back to plain gradients there, so the score is gradient × activation
through those ops — still a usable ranking, not exact DeepLift. In-place activations
(``inplace=True``) break Captum's hooks: the model must not use them.
"""

from __future__ import annotations

import torch
from torch import nn

from mergeforge.errors import ConfigError
from mergeforge.fusion.levels import channel_dim, eval_mode

METHODS = ("uniform", "conductance", "deeplift", "ablation")
# A floor so that a dead neuron keeps a tiny weight: weighted centroids and the pairing cost
# s_i s_j / (s_i + s_j) stay defined.
FLOOR = 1e-8


def neuron_importance(
    model: nn.Module,
    layer: nn.Module,
    inputs: torch.Tensor,
    *,
    method: str = "uniform",
    width: int | None = None,
    labels: torch.Tensor | None = None,
    batch_size: int = 64,
    n_steps: int = 20,
    dim: int | None = None,
) -> torch.Tensor:
    """Importance (float64, sums to 1) of the output neurons of ``layer`` (a submodule of
    ``model``) over ``inputs``. ``width`` (the neuron count) is needed for ``uniform`` only.
    ``n_steps``: integration steps of Conductance. ``dim``: the neuron axis of the layer's
    output (default :func:`~mergeforge.fusion.levels.channel_dim`; a permutation spec's point
    names its own). Every module's train/eval flag is restored."""
    if method not in METHODS:
        raise ConfigError(f"unknown neuron importance {method!r}; choose one of {list(METHODS)}")
    if method == "uniform":
        if width is None:
            raise ConfigError("uniform importance needs the level's width")
        return torch.full((width,), 1.0 / width, dtype=torch.float64, device=inputs.device)
    total: torch.Tensor | None = None
    with eval_mode([model]):  # restores each module's own train/eval flag
        for i, xb in enumerate(inputs.split(batch_size)):
            tb = _targets(model, xb, labels, i * batch_size)
            attr = _attribute(method, model, layer, xb, tb, n_steps, dim)
            # ablation already returns B×n
            c = _axis(attr.ndim, None if method == "ablation" else dim)
            dims = [d for d in range(attr.ndim) if d != c]
            part = attr.detach().abs().double().sum(dim=dims)
            total = part if total is None else total + part
    assert total is not None
    return normalise(total)


def normalise(s: torch.Tensor) -> torch.Tensor:
    """Scores → weights summing to 1, each at least ``FLOOR`` / n (all-zero → uniform)."""
    s = s.double().clamp_min(0)
    if not bool(torch.isfinite(s).all()) or float(s.sum()) == 0.0:
        return torch.full_like(s, 1.0 / len(s))
    s = s / s.sum() + FLOOR / len(s)
    return s / s.sum()


def _axis(ndim: int, dim: int | None) -> int:
    return channel_dim(ndim) if dim is None else dim % ndim


@torch.no_grad()
def _targets(model, xb, labels, start):
    if labels is not None:
        return labels[start : start + len(xb)]
    return model(xb).argmax(-1)


def _attribute(method, model, layer, xb, tb, n_steps, dim):
    from captum.attr import LayerConductance, LayerDeepLift

    if method == "conductance":
        # trapezoid steps: Captum multiplies each step's gradient by the layer's change
        # between steps, which telescopes (exact when the gradient is constant); Gauss-Legendre
        # nodes do not and need many more steps
        return LayerConductance(model, layer).attribute(
            xb, target=tb, n_steps=n_steps, method="riemann_trapezoid"
        )
    if method == "deeplift":
        return LayerDeepLift(model, layer).attribute(xb, baselines=0.0, target=tb)
    return _ablation(model, layer, xb, tb, dim)


@torch.no_grad()
def _ablation(model, layer, xb, tb, dim, rows: int = 512):
    """Per sample, the drop of the target logit when one neuron is set to 0 at every position
    (Captum's LayerFeatureAblation with one mask group per neuron, done directly: its batched
    perturbations reject a per-sample target in captum 0.9). Several neurons per forward pass,
    each on its own copy of the batch. Returns B×n (the drop, as one "position")."""
    b = len(xb)
    shape = _layer_shape(model, layer, xb[:1])
    c = _axis(len(shape), dim)
    width = shape[c]
    base = model(xb).gather(1, tb[:, None])[:, 0]
    drops = []
    for js in torch.arange(width).split(max(1, rows // b)):
        keep = torch.ones(len(js), width, device=xb.device)
        keep[torch.arange(len(js)), js] = 0
        view = [len(js), 1] + [1] * (len(shape) - 1)
        view[c + 1] = width
        mask = keep.view(view)

        def zero(module, args, out, mask=mask):
            return (out.reshape(len(mask), b, *out.shape[1:]) * mask.to(out.dtype)).reshape(
                out.shape
            )

        handle = layer.register_forward_hook(zero)
        try:
            logits = model(xb.repeat(len(js), *[1] * (xb.ndim - 1)))
        finally:
            handle.remove()
        got = logits.gather(1, tb.repeat(len(js))[:, None])[:, 0].view(len(js), b)
        drops.append((base - got).T)
    return torch.cat(drops, 1)


def _layer_shape(model, layer, x):
    seen = {}

    def hook(module, args, out):  # returns None: the output is left as it is
        seen["s"] = out.shape

    handle = layer.register_forward_hook(hook)
    try:
        model(x)
    finally:
        handle.remove()
    return seen["s"]
