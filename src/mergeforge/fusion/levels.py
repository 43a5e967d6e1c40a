"""A model as an ordered chain of levels (2507.00037 §3: fusion walks the network level by level).

A *level* is the sub-network that produces one representation: an MLP layer, a VGG conv block, a
ResNet basic block, a ViT encoder block. Skip connections stay inside one level, so composing the
levels in order is the forward pass and the DAG the paper fuses is a chain. Each level has a kind:

- ``"affine"``: exactly one ``Linear``/``Conv2d`` with parameters, the rest parameter-free
  (elementwise, pooling, flatten): ``pre`` ops → affine → ``post`` ops, where the post ops act on
  each output channel separately. Its pre-activation is fitted in closed form (fit.py).
- ``"head"``: the last level (class c of the fused model is class c of every parent); it keeps
  its ``affine`` parts when it has that shape.
- ``"general"``: anything else (residual blocks, transformer blocks), fitted by gradient.

A level carries a *residual stream* (``stream_of``) when its output is its input plus something
(an identity shortcut): its output neuron j *is* input neuron j, so fusion must keep the neuron
order of the level that created the stream. Found by a probe (the level with every parameter set
to zero returns its input on a real batch: true of ``relu(f(x) + x)`` after a ReLU and of pre-norm
transformer blocks, false of any level without an identity path), or given as ``streams``.
Post-norm blocks, ``LN(x + f(x))``, are not detected: pass them in ``streams``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from mergeforge.errors import ValidationError

# Parameter-free ops that act on each channel alone (an affine level's post ops) …
CHANNELWISE = (
    nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.Softplus,
    nn.Hardtanh, nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)  # fmt: skip
# … and those also allowed before the affine module (reshaping is fine there).
PRE_OPS = (*CHANNELWISE, nn.Flatten)


@dataclass(frozen=True)
class Level:
    """One level. ``affine``/``pre``/``post``: child names inside the level (``""`` = the level
    itself is the Linear/Conv2d); ``affine`` is None when no closed form applies."""

    name: str
    kind: str
    affine: str | None = None
    pre: tuple[str, ...] = ()
    post: tuple[str, ...] = ()
    stream_of: str | None = None
    has_params: bool = True


@dataclass(frozen=True)
class LevelSpec:
    """A model's levels in forward order (the same for every parent of one architecture)."""

    levels: tuple[Level, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(lv.name for lv in self.levels)

    def __len__(self) -> int:
        return len(self.levels)

    def module(self, model: nn.Module, index: int) -> nn.Module:
        return model.get_submodule(self.levels[index].name)

    def parts(self, model: nn.Module, index: int) -> tuple[list[nn.Module], nn.Module, list]:
        """``(pre ops, affine module, post ops)`` of an affine-shaped level of ``model``."""
        lv, mod = self.levels[index], self.module(model, index)
        if lv.affine is None:
            raise ValidationError(f"level {lv.name!r} has no single affine module")
        if lv.affine == "":
            return [], mod, []
        get = mod.get_submodule
        return [get(n) for n in lv.pre], get(lv.affine), [get(n) for n in lv.post]


def _affine_parts(mod: nn.Module) -> tuple[str, tuple[str, ...], tuple[str, ...]] | None:
    """The (affine, pre, post) child names when ``mod`` is pre ops → Linear/Conv2d → post ops."""
    if _closed_form_ok(mod):
        return "", (), ()
    if not isinstance(mod, nn.Sequential):
        return None
    names = [n for n, _ in mod.named_children()]
    hits = [i for i, (_, c) in enumerate(mod.named_children()) if _closed_form_ok(c)]
    if len(hits) != 1:
        return None
    i = hits[0]
    kids = list(mod.children())
    if not all(type(c) in PRE_OPS for c in kids[:i]):
        return None
    if not all(type(c) in CHANNELWISE for c in kids[i + 1 :]):
        return None
    return names[i], tuple(names[:i]), tuple(names[i + 1 :])


def _closed_form_ok(mod: nn.Module) -> bool:
    if type(mod) is nn.Linear:
        return True
    # unfold pads with zeros and cannot express groups: other convs are fitted by gradient
    return (
        type(mod) is nn.Conv2d
        and mod.groups == 1
        and mod.padding_mode == "zeros"
        and not isinstance(mod.padding, str)
    )


@torch.no_grad()
def _is_stream(level: nn.Module, x: torch.Tensor) -> bool:
    """True when the level with every parameter zeroed returns its (non-zero) input ``x``."""
    if not any(True for _ in level.parameters()) or float(x.abs().max()) == 0.0:
        return False
    probe = copy.deepcopy(level).eval()
    for p in probe.parameters():
        p.zero_()
    out = probe(x)
    return out.shape == x.shape and bool(torch.allclose(out, x, rtol=1e-5, atol=1e-6))


def levels_of(
    model: nn.Module,
    names: Sequence[str] | None = None,
    *,
    sample: torch.Tensor | None = None,
    streams: Mapping[str, str] | None = None,
) -> LevelSpec:
    """The :class:`LevelSpec` of ``model`` from ``names`` (default: ``model.levels``).

    With a ``sample`` batch the chain is checked to reproduce ``model(sample)`` and residual
    streams are probed (see the module docstring); ``streams`` (level → the level whose neurons
    it carries) overrides the probe, as does a ``level_streams`` mapping on the model. Errors name
    the missing module and list the model's top-level children.
    """
    if names is None:
        names = getattr(model, "levels", None)
        if not names:
            raise ValidationError(
                f"{type(model).__name__} declares no `levels`; pass the ordered module names "
                "whose composition is the forward pass (names=[...])"
            )
    names = tuple(names)
    children = [n for n, _ in model.named_children()]
    for n in names:
        try:
            model.get_submodule(n)
        except AttributeError:
            raise ValidationError(
                f"level {n!r} is not a module of {type(model).__name__}; its top-level "
                f"children are {children}"
            ) from None
    for a in names:
        for b in names:
            if a != b and b.startswith(a + "."):
                raise ValidationError(f"levels {a!r} and {b!r} overlap (one contains the other)")
    if len(set(names)) != len(names):
        raise ValidationError(f"a level is listed twice in {list(names)}")
    given = streams if streams is not None else getattr(model, "level_streams", None)
    declared = dict(given or {})
    levels = []
    for i, n in enumerate(names):
        mod = model.get_submodule(n)
        parts = _affine_parts(mod)
        kind = "head" if i == len(names) - 1 else ("affine" if parts else "general")
        aff, pre, post = parts or (None, (), ())
        has = any(True for _ in mod.parameters())
        levels.append(Level(n, kind, aff, pre, post, declared.get(n), has))
    spec = LevelSpec(tuple(levels))
    if sample is not None:
        spec = _check_and_probe(model, spec, sample, probe=given is None)
    return _resolve_streams(spec)


@contextmanager
def eval_mode(models: Sequence[nn.Module]):
    """Run in eval mode (no dropout noise), restoring every submodule's flag afterwards."""
    flags = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, was in flags:
            m.training = was


@torch.no_grad()
def _check_and_probe(model: nn.Module, spec: LevelSpec, x: torch.Tensor, probe: bool):
    why = "running them in order does not reproduce model(x)"
    i, h, levels = 0, x, list(spec.levels)
    with eval_mode([model]):
        want = model(x)
        try:
            for i in range(len(spec)):
                if probe and i > 0 and levels[i].kind == "general":
                    if _is_stream(spec.module(model, i), h):
                        levels[i] = dataclasses.replace(levels[i], stream_of=levels[i - 1].name)
                h = spec.module(model, i)(h)
            ok = h.shape == want.shape and bool(torch.allclose(h, want, rtol=1e-4, atol=1e-5))
        except RuntimeError as exc:  # a level fed the wrong shape
            ok, why = False, f"level {spec.names[i]!r} fails on the previous level's output ({exc})"
    if not ok:
        raise ValidationError(
            f"the levels {list(spec.names)} of {type(model).__name__} do not cover its forward "
            f"pass: {why}; list every module the forward uses, in order, and keep skip "
            "connections inside one level"
        )
    return LevelSpec(tuple(levels))


def _resolve_streams(spec: LevelSpec) -> LevelSpec:
    """Point every stream at the level that created it (a stream of a stream → its root)."""
    index = {n: i for i, n in enumerate(spec.names)}
    out = []
    for i, lv in enumerate(spec.levels):
        root = lv.stream_of
        if root is not None:
            if root not in index or index[root] >= i:
                raise ValidationError(
                    f"level {lv.name!r}: its stream origin {root!r} is not an earlier level"
                )
            while (up := out[index[root]].stream_of) is not None:
                root = up
            if not spec.levels[index[root]].has_params:
                raise ValidationError(
                    f"level {lv.name!r} carries the stream of {root!r}, which has no parameters; "
                    "merge that level into the one before it"
                )
        out.append(dataclasses.replace(lv, stream_of=root))
    return LevelSpec(tuple(out))


def _chained(mods: list[nn.Module], x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``x`` through ``mods`` in turn, ``batch_size`` rows at a time (only the result kept)."""
    out = []
    for xb in x.split(batch_size):
        for m in mods:
            xb = m(xb)
        out.append(xb)
    return torch.cat(out)


@torch.no_grad()
def run_prefix(
    model: nn.Module, spec: LevelSpec, x: torch.Tensor, upto: int, *, batch_size: int = 256
) -> torch.Tensor:
    """The input of level ``upto`` (``len(spec)`` = the model output) for every row of ``x``,
    computed ``batch_size`` rows at a time (only the result is kept)."""
    mods = [spec.module(model, i) for i in range(upto)]
    return _chained(mods, x, batch_size)


@torch.no_grad()
def run_level(
    model: nn.Module,
    spec: LevelSpec,
    x: torch.Tensor,
    index: int,
    *,
    preactivation: bool = False,
    batch_size: int = 256,
) -> torch.Tensor:
    """Level ``index``'s output on ``model``'s own prefix of ``x`` (its affine module's output,
    before the post ops, with ``preactivation``), ``batch_size`` rows at a time."""
    mods = [spec.module(model, i) for i in range(index)]
    if preactivation:
        pre, aff, _ = spec.parts(model, index)
        mods += [*pre, aff]
    else:
        mods.append(spec.module(model, index))
    return _chained(mods, x, batch_size)


def neuron_matrix(a: torch.Tensor) -> torch.Tensor:
    """Rows = sample × position, columns = neurons: B×d → B×d, B×T×d → (B·T)×d (features last),
    B×C×H×W → (B·H·W)×C (channels)."""
    if a.ndim == 2:
        return a
    if a.ndim == 3:
        return a.reshape(-1, a.shape[-1])
    if a.ndim == 4:
        return a.permute(0, 2, 3, 1).reshape(-1, a.shape[1])
    raise ValidationError(f"level output of shape {tuple(a.shape)}: expected 2, 3 or 4 dims")


def from_neuron_matrix(m: torch.Tensor, like: torch.Size) -> torch.Tensor:
    """The inverse of :func:`neuron_matrix` for an activation of shape ``like``."""
    if len(like) == 4:
        b, c, h, w = like
        return m.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()
    return m.reshape(like)


def channel_dim(ndim: int) -> int:
    """The neuron axis of a level output with ``ndim`` dims (features last except for images)."""
    return 1 if ndim in (2, 4) else ndim - 1
