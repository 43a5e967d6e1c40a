"""Diagonal Fisher information: F = mean over examples of (∂ log p(y | x) / ∂θ)², per parameter.

Per example (a batch of one), as the definition (Matena & Raffel, 2111.09832): the square of a
batch's summed gradient is not the sum of the per-example squares. ``y`` is

* ``empirical``: the example's true label(s);
* ``sampled``: drawn from the model's own predictive distribution (seeded ``generator``), a
  one-sample Monte-Carlo estimate of the true Fisher E_{y~p}[(∇ log p(y|x))²].

An example may make several predictions (a causal LM predicts every next token): its
log-likelihood is the sum over them, one gradient per example. FusionBench instead squares the
gradient of Σ_batch Σ_c √p_c log p_c (batches of 32): neither of the two above, and not per
example; its *merge* (``merging_with_fisher_weights``) is what mergeforge's ``fisher`` matches.
Parameters that get no gradient (an unused pooler) get a zero Fisher.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Literal, TypeVar

import torch
from torch import Tensor, nn

E = TypeVar("E")
FisherMode = Literal["empirical", "sampled"]
MODES = ("empirical", "sampled")


def log_likelihood(
    logits: Tensor, labels: Tensor, mode: FisherMode, generator: torch.Generator | None
) -> Tensor:
    """Σ_t log softmax(logits)[t, y_t] for ``logits`` (T, K) and true ``labels`` (T,); in
    ``sampled`` mode y_t ~ softmax(logits[t]) instead (drawn on the CPU with ``generator``)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if mode == "sampled":
        probs = logp.detach().exp().cpu()
        labels = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    elif mode != "empirical":
        raise ValueError(f"Fisher mode must be one of {MODES}, got {mode!r}")
    return logp.gather(-1, labels.to(logp.device).long()[:, None]).sum()


def diagonal_fisher(
    params: Mapping[str, nn.Parameter],
    examples: Iterable[E],
    logits_fn: Callable[[E], tuple[Tensor, Tensor]],
    *,
    mode: FisherMode = "sampled",
    seed: int = 0,
    on_example: Callable[[], None] | None = None,
) -> tuple[dict[str, Tensor], int]:
    """``({name: F (shape of the parameter), fp32 on the CPU}, number of examples)``.

    ``logits_fn(example) -> (logits (T, K), labels (T,))`` runs the model on one example;
    ``labels`` are ignored in ``sampled`` mode. Gradients are taken with ``autograd.grad``, so
    the parameters' ``.grad`` are left alone.
    """
    names = list(params)
    tensors = [params[n] for n in names]
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in tensors]
    gen = torch.Generator().manual_seed(seed)
    n = 0
    for ex in examples:
        logits, labels = logits_fn(ex)
        ll = log_likelihood(logits, labels, mode, gen)
        grads = torch.autograd.grad(ll, tensors, allow_unused=True)
        for a, g in zip(acc, grads, strict=True):
            if g is not None:
                a.add_(g.detach().float().square())
        n += 1
        if on_example is not None:
            on_example()
    if n == 0:
        raise ValueError("no examples to compute the Fisher on")
    return {name: (a / n).cpu() for name, a in zip(names, acc, strict=True)}, n
