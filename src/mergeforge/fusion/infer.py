"""Inferring a permutation spec for a plain chain of ``nn.Linear`` / ``nn.Conv2d`` layers.

Git Re-Basin (2209.04836 §3) writes a ``permutation_spec`` by hand per architecture; for the
simplest case — layers separated only by elementwise activations, pooling and flatten — the spec
follows from the forward graph: every hidden layer's output channels form one group that its
bias and the next layer's input axis share. This module traces the model with ``torch.fx`` and
builds that spec; anything else (skips, norms, attention) must state ``permutation_spec()``.
"""

from __future__ import annotations

import torch
from torch import nn

from mergeforge.errors import ValidationError
from mergeforge.fusion.permspec import HOWTO, Entry, PermutationSpec

# Layers between two Linear / Conv2d layers that act on each channel alike (or pool over space),
# so a channel permutation passes through them unchanged.
_PASS_MODULES = (
    nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Identity,
    nn.Dropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)  # fmt: skip
_PASS_FUNCTIONS = {
    "relu", "gelu", "tanh", "sigmoid", "silu", "leaky_relu", "elu", "dropout", "max_pool2d",
    "avg_pool2d", "adaptive_avg_pool2d",
}  # fmt: skip


def infer_spec(model: nn.Module) -> PermutationSpec:
    """The spec of a plain chain ``x → layer → (elementwise / pooling / Flatten)* → layer …``
    of ``nn.Linear`` and ``nn.Conv2d`` (traced with ``torch.fx``): one group per layer's output
    channels except the last layer's (the model's outputs keep their order). A group is observed
    after the layer's last following module that keeps channels (its activation / pooling
    module; the layer itself when the activation is a function). Anything else (skip
    connections, norms, attention, grouped convs) raises, asking for ``permutation_spec()``."""
    name = type(model).__name__

    def fail(why: str) -> ValidationError:
        return ValidationError(f"cannot infer a permutation spec for {name}: {why}; {HOWTO}")

    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # fx raises many types on dynamic control flow
        raise fail(f"torch.fx cannot trace it ({type(exc).__name__}: {exc})") from None
    modules = dict(model.named_modules())
    layers: list[tuple[str, nn.Module]] = []  # (module name, Linear / Conv2d)
    points: dict[str, str] = {}
    flattened = False  # a Flatten has run: no conv may follow
    flat_since_layer = False  # ... since the last layer: later modules are not its points
    prev = None
    for node in graph.nodes:
        if node.op == "placeholder":
            prev = node
            continue
        inputs = node.all_input_nodes
        if node.op == "output":
            break
        if len(inputs) != 1 or inputs[0] is not prev or len(prev.users) != 1:
            raise fail(f"{node.name!r} is not part of a single chain (a skip connection?)")
        prev = node
        if node.op == "call_module":
            mod = modules[node.target]
            if isinstance(mod, nn.Linear | nn.Conv2d):
                if isinstance(mod, nn.Conv2d) and (mod.groups != 1 or flattened):
                    raise fail(f"conv {node.target!r} is grouped or follows a Flatten")
                layers.append((node.target, mod))
                points[node.target] = node.target
                flat_since_layer = False
            elif isinstance(mod, nn.Flatten):
                flattened = flat_since_layer = True
            elif isinstance(mod, _PASS_MODULES):
                if layers and not flat_since_layer:
                    points[layers[-1][0]] = node.target
            else:
                raise fail(f"module {node.target!r} is a {type(mod).__name__}")
        elif node.op in ("call_function", "call_method"):
            fname = getattr(node.target, "__name__", str(node.target))
            if fname == "flatten":
                flattened = flat_since_layer = True
            elif fname not in _PASS_FUNCTIONS:
                raise fail(f"operation {fname!r} is not elementwise, pooling or flatten")
        else:
            raise fail(f"graph node {node.name!r} ({node.op}) reads a parameter directly")
    if not layers:
        raise fail("it has no Linear or Conv2d layer")
    axes: dict[str, tuple[Entry, ...]] = {}
    pts: dict[str, tuple[tuple[str, int], ...]] = {}
    incoming: tuple[str, int] | None = None  # (group, channels) feeding the next layer
    for i, (lname, mod) in enumerate(layers):
        last = i == len(layers) - 1
        group = None if last else lname
        entry_in: Entry = None
        if incoming is not None:
            g, c = incoming
            fan_in = mod.weight.shape[1]
            if fan_in % c:
                raise fail(f"{lname!r} has {fan_in} inputs, not a multiple of {c} channels")
            entry_in = g if fan_in == c else (g, fan_in // c)
        rest = (None,) * (mod.weight.ndim - 2)
        axes[f"{lname}.weight"] = (group, entry_in, *rest)
        if mod.bias is not None:
            axes[f"{lname}.bias"] = (group,)
        if group is not None:
            pts[group] = ((points[lname], 1 if isinstance(mod, nn.Conv2d) else -1),)
            incoming = (group, mod.weight.shape[0])
    return PermutationSpec(axes=axes, points=pts)
