"""RegMean's input Grams: G = XᵀX / n for every linear layer, from forward hooks.

X is the layer's input flattened over batch and sequence, (n, in). Padding positions are not
examples: when a batch's ``attention_mask`` (B, T) matches the input's leading dimensions, only
rows where it is 1 are counted (FusionBench counts every position, padding included; on padded
batches its Grams are pulled towards the pad tokens' activations). Inputs whose leading shape
does not match (e.g. BERT's pooler sees (B, H)) count every row. Per-batch products are taken in
fp32 and summed in fp64, so thousands of batches do not lose bits.

Keys are the weight's parameter name (module name + ``.weight``); a Gram is (in, in) where ``in``
is ``weight.shape[1]`` for ``nn.Linear`` and ``weight.shape[0]`` for GPT-2's ``Conv1D``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{module name: module}`` of every ``nn.Linear`` and transformers ``Conv1D``."""
    kinds: tuple[type, ...] = (nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D

        kinds = (nn.Linear, Conv1D)
    except ImportError:  # transformers is optional for plain torch models
        pass
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


class GramRecorder:
    """Context manager: while active, every forward of ``model`` adds each linear layer's
    XᵀX and row count. Set :attr:`mask` to the batch's attention mask (B, T) before a forward to
    skip padding rows. :meth:`grams` returns ``{weight name: G (in, in) fp32}``."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = linear_modules(model)
        self.mask: Tensor | None = None
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}
        self._handles: list[Any] = []

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            x = inputs[0].detach()
            if self.mask is not None and tuple(x.shape[:-1]) == tuple(self.mask.shape):
                x = x[self.mask.to(x.device).bool()]  # (n_real, in)
            else:
                x = x.reshape(-1, x.shape[-1])
            x = x.float()
            xtx = (x.T @ x).double()
            if name in self._sums:
                self._sums[name] += xtx
                self._counts[name] += x.shape[0]
            else:
                self._sums[name], self._counts[name] = xtx, x.shape[0]

        return hook

    def __enter__(self) -> GramRecorder:
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def grams(self) -> dict[str, Tensor]:
        """``{module + '.weight': XᵀX / n}`` for every layer that saw at least one row."""
        return {
            f"{name}.weight": (s / self._counts[name]).float().cpu()
            for name, s in self._sums.items()
            if self._counts[name] > 0
        }


@torch.no_grad()
def compute_grams(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    forward: Callable[[Mapping[str, Tensor]], Any] | None = None,
) -> dict[str, Tensor]:
    """Grams of every linear layer of ``model`` over ``batches`` (tokenized dicts with
    ``attention_mask``). ``forward(batch)`` runs the model (default ``model(**batch)``)."""
    run = forward or (lambda b: model(**b))
    with GramRecorder(model) as rec:
        for batch in batches:
            rec.mask = batch.get("attention_mask")
            run(batch)
    return rec.grams()
