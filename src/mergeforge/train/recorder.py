"""The curvature recorder: R and C of UMTAM (arXiv 2512.17109) recorded beside *any* optimizer
(AdamW, SGD, Adafactor ...), written as the curvature artifact (:mod:`.artifact`).

Per weight G of shape (m, n) (more dimensions read as (shape[0], prod(rest))), at every
optimizer step, with g² taken elementwise in fp32 (../shared/ALGORITHMS.md §4):

* ``ema`` (the paper): R ← β₂R + (1−β₂)·rowsum(G²), C ← β₂C + (1−β₂)·colsum(G²);
* ``notebook`` (the authors' experiment notebooks): the same EMAs of row / column *means*;
* ``sum`` (their later variant): R = Σ_t rowsum(G_t²) / T, C likewise.

1-D parameters (biases, norms) keep the elementwise moment g² the same way. R and C start at 0
with no bias correction, as the paper writes them (its optimizer's floor R, C ≥ 1e-4 is a clamp
of the *stable optimizer*, not of the statistic). State: m + n fp32 per matrix (≤ 2(m + n), the
issue's target), the parameter's size per 1-D parameter; while a step is recorded, one g² of
the largest parameter and the new row / column moments of all parameters exist briefly.

*Which gradient, when.* Given ``optimizer=``, the recorder reads every ``.grad`` in a step
pre-hook of that optimizer (:meth:`torch.optim.Optimizer.register_step_pre_hook`): once per
optimizer step, with the gradient the optimizer uses: after every micro-batch of gradient
accumulation, after clipping, and unscaled by a ``GradScaler`` (whose overflowing steps call no
``step`` and are therefore not recorded). Per-parameter gradient hooks
(``register_post_accumulate_grad_hook``) were not used: under gradient accumulation they fire
once per micro-batch with the running sum, whose square is not the step's G², and under AMP they
see scaled (possibly infinite) gradients. Without an optimizer, call :meth:`step` yourself after
the last backward of a step. A parameter whose ``.grad`` is ``None`` at a step counts as a zero
gradient (the statistic does not depend on ``zero_grad(set_to_none=...)``): an EMA decays.

*Names and tied parameters.* Parameters are tracked once each (``model.named_parameters()``), and
:meth:`save` stores each under the first of its names that the saved checkpoint holds, so a tied
``lm_head.weight`` / ``embed_tokens.weight`` pair (one tensor, saved once) is stored once, under
the saved name, with the gradient of both uses. A parameter the saved model lacks under every
name is left out with a warning.

A non-finite gradient raises :class:`~mergeforge.errors.ValidationError` naming the parameter
and nothing of that step is accumulated.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mergeforge.errors import ValidationError
from mergeforge.train.artifact import (
    VARIANTS,
    Curvature,
    CurvatureMeta,
    factored,
    matrix_shape,
    save_curvature,
)

DEFAULT_BETA2 = 0.999


def gradient_moments(grad: Tensor, *, mean: bool) -> tuple[Tensor, Tensor | None]:
    """(rowsum(G²) (m,), colsum(G²) (n,)) of ``grad`` read as (m, n), fp32; row / column means
    when ``mean``; (g², None) for a 1-D (or 0-D) gradient."""
    g2 = grad.detach().to_dense().float().square()
    if not factored(grad.shape):
        return g2, None
    g2 = g2.reshape(matrix_shape(grad.shape))
    return (g2.mean(1), g2.mean(0)) if mean else (g2.sum(1), g2.sum(0))


def accumulate(acc: Tensor, new: Tensor | None, beta2: float | None) -> None:
    """In place: acc ← β₂·acc + (1−β₂)·new (an EMA), or acc + new when ``beta2`` is ``None``;
    ``new`` ``None`` is a zero moment."""
    if beta2 is None:
        if new is not None:
            acc.add_(new)
    elif new is None:
        acc.mul_(beta2)
    else:
        acc.mul_(beta2).add_(new, alpha=1 - beta2)


def resolve_beta2(variant: str, beta2: float | None) -> float | None:
    """Check ``variant`` and ``beta2``; the EMA decay to use (0.999 by default; ``None`` for
    ``sum``)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "sum":
        if beta2 is not None:
            raise ValueError("beta2 has no meaning for variant 'sum' (a plain average)")
        return None
    beta2 = DEFAULT_BETA2 if beta2 is None else float(beta2)
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"beta2 must be in [0, 1), got {beta2}")
    return beta2


class CurvatureRecorder:
    """Record R and C of ``model``'s trainable parameters while it trains (module docstring).

    ``optimizer``: record at each of its steps (else call :meth:`step`); its class name goes
    into the artifact's ``source``. ``variant``: one of :data:`~.artifact.VARIANTS`. ``beta2``:
    the EMA decay (default 0.999; not used by ``sum``). ``keep_exp_avg_sq``: also store the
    optimizer's ``exp_avg_sq`` (Adam, AdamW) for OTA. ``params``: parameter names to track
    (default: every parameter that requires a gradient).

    Use as a context manager, or call :meth:`close` to remove the hook; statistics stay readable
    (:meth:`curvature`, :meth:`save`) after closing.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        variant: str = "ema",
        beta2: float | None = None,
        keep_exp_avg_sq: bool = False,
        params: Iterable[str] | None = None,
    ) -> None:
        beta2 = resolve_beta2(variant, beta2)
        if keep_exp_avg_sq and optimizer is None:
            raise ValueError("keep_exp_avg_sq reads the optimizer's state: pass optimizer=")
        self.variant, self.beta2 = variant, beta2
        self.optimizer, self.keep_exp_avg_sq = optimizer, keep_exp_avg_sq
        self.steps = 0
        self._aliases: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self._aliases.setdefault(id(p), []).append(name)
        named = dict(model.named_parameters())
        if params is None:
            chosen = [n for n, p in named.items() if p.requires_grad]
        else:
            chosen = list(params)
            unknown = [n for n in chosen if n not in named]
            if unknown:
                raise ValueError(f"params: {unknown[0]!r} is not a parameter of the model "
                                 f"(e.g. {next(iter(named), 'none')!r})")  # fmt: skip
        if not chosen:
            raise ValueError("no parameters to record (none requires a gradient)")
        self._params: list[tuple[str, nn.Parameter]] = [(n, named[n]) for n in chosen]
        self._R: dict[str, Tensor] = {}
        self._C: dict[str, Tensor | None] = {}
        for n, p in self._params:
            if factored(p.shape):
                m, k = matrix_shape(p.shape)
                self._R[n] = torch.zeros(m, device=p.device, dtype=torch.float32)
                self._C[n] = torch.zeros(k, device=p.device, dtype=torch.float32)
            else:
                self._R[n] = torch.zeros(p.shape, device=p.device, dtype=torch.float32)
                self._C[n] = None
        self._handles: list[Any] = []
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(self._pre_step))
        self._check: Any = None
        if keep_exp_avg_sq:
            self._check = optimizer.register_step_post_hook(self._check_state)

    # -- recording ---------------------------------------------------------------------------

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.step()

    def _check_state(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """After the optimizer's first step: fail now, not at save, when it keeps no
        ``exp_avg_sq``."""
        self._check.remove()
        self._check = None
        for name, p in self._params:
            if optimizer.state.get(p):
                self._exp_avg_sq(name, p)
                break

    @torch.no_grad()
    def step(self) -> None:
        """Record the parameters' current ``.grad`` as one step (called by the optimizer hook;
        call it yourself after the last backward of each step when no optimizer was given)."""
        mean = self.variant == "notebook"
        new = [
            None if p.grad is None else gradient_moments(p.grad, mean=mean) for _, p in self._params
        ]
        # one device sync per step, not one per parameter: a NaN / Inf anywhere in G shows in
        # its row moment (every entry lies in some row)
        flags = [torch.isfinite(x[0]).all() for x in new if x is not None]
        if flags and not bool(torch.stack([f.to(flags[0].device) for f in flags]).all()):
            for (name, _), x in zip(self._params, new, strict=True):
                if x is not None and not bool(torch.isfinite(x[0]).all()):
                    raise ValidationError(
                        f"non-finite gradient: {name} has a NaN or infinite gradient (or one "
                        f"whose square overflows) at recorded step {self.steps + 1}; nothing of "
                        "this step was recorded. Lower the learning rate, use gradient clipping, "
                        "or find the operation that produces it"
                    )
        for (name, _), x in zip(self._params, new, strict=True):
            accumulate(self._R[name], None if x is None else x[0], self.beta2)
            C = self._C[name]
            if C is not None:
                accumulate(C, None if x is None else x[1], self.beta2)
        self.steps += 1

    def close(self) -> None:
        """Remove the optimizer hooks (statistics are kept)."""
        for h in self._handles + ([self._check] if self._check is not None else []):
            h.remove()
        self._handles, self._check = [], None

    def __enter__(self) -> CurvatureRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -----------------------------------------------------------------------------

    def state_floats(self) -> dict[str, int]:
        """``{parameter: fp32 numbers held for it}`` (R and C), for the memory budget."""
        return {
            n: self._R[n].numel() + (0 if self._C[n] is None else self._C[n].numel())
            for n, _ in self._params
        }

    def _exp_avg_sq(self, name: str, p: nn.Parameter) -> Tensor:
        assert self.optimizer is not None
        state = self.optimizer.state.get(p)
        if not state:  # never stepped (no gradient yet, or not in the optimizer): zero, like Adam's
            return torch.zeros(p.shape, dtype=torch.float32)
        if "exp_avg_sq" not in state:
            raise ValidationError(
                f"keep_exp_avg_sq: {type(self.optimizer).__name__} keeps no 'exp_avg_sq' for "
                f"{name} (its state holds {sorted(state)}); it needs an Adam-like optimizer "
                "(torch.optim.Adam / AdamW), or leave keep_exp_avg_sq off"
            )
        return state["exp_avg_sq"].detach().float().cpu().clone()

    def curvature(self) -> dict[str, Curvature]:
        """``{parameter name (model.named_parameters()): Curvature}``, fp32 on the CPU; ``sum``
        divided by the steps."""
        div = max(self.steps, 1) if self.variant == "sum" else 1
        out = {}
        for n, p in self._params:
            C = self._C[n]
            out[n] = Curvature(
                R=(self._R[n] / div).cpu(),
                C=None if C is None else (C / div).cpu(),
                v=self._exp_avg_sq(n, p) if self.keep_exp_avg_sq else None,
            )
        return out

    @property
    def source(self) -> str:
        """``recorder:<optimizer class>`` (``recorder:unknown`` when stepped by hand)."""
        opt = "unknown" if self.optimizer is None else type(self.optimizer).__name__
        return f"recorder:{opt}"

    def save(self, model_dir: str | os.PathLike[str], *, examples: int | None = None) -> Path:
        """Write the curvature artifact beside the model saved in ``model_dir`` (save the model
        first: ``model.save_pretrained(model_dir)``), keyed by the checkpoint's names (module
        docstring). ``examples``: how many training examples the steps saw, when known."""
        from mergeforge.checkpoint import open_checkpoint

        if self.steps == 0:
            raise ValidationError(
                "no training step was recorded: pass optimizer= to CurvatureRecorder, or call "
                "recorder.step() after the backward of each step"
            )
        ck = open_checkpoint(Path(os.fspath(model_dir)))
        try:
            keys = set(ck.keys())
        finally:
            ck.close()
        by_name = dict(self._params)
        stats, missing = {}, []
        for name, c in self.curvature().items():
            saved = next((a for a in self._aliases[id(by_name[name])] if a in keys), None)
            if saved is None:
                missing.append(name)
            else:
                stats[saved] = c
        if not stats:
            raise ValidationError(
                f"none of the recorded parameters (e.g. {missing[0]!r}) is a tensor of the model "
                f"saved in {model_dir}: save this model there first (save_pretrained)"
            )
        if missing:
            warnings.warn(
                f"{len(missing)} recorded parameters are not in the model saved in {model_dir} "
                f"and get no curvature statistics (e.g. {missing[0]!r})",
                stacklevel=2,
            )
        meta = CurvatureMeta(variant=self.variant, steps=self.steps, source=self.source,
                             beta2=self.beta2, examples=examples)  # fmt: skip
        return save_curvature(model_dir, stats, meta)
