"""Permutation specs: which parameter axes each neuron permutation acts on (Git Re-Basin,
2209.04836 §3 and its ``permutation_spec``), where the permuted features can be observed, and
the one function every alignment baseline builds its fused state dict with.

A *group* is one set of interchangeable neurons: permuting its features (and every parameter
axis it acts on) leaves the model's function unchanged. Residual streams, their biases and norms
share one group. An axis entry is ``None`` (not permuted), a group name ``"P"``, or ``("P", r)``:
the axis is the channel-major flatten of (channels × r) and ``P`` acts on the channels (a linear
layer after ``Flatten`` of a C×H×W map has r = H·W).

A model states its spec with a ``permutation_spec()`` method returning
``{"axes": ..., "points": ..., "output_axis": ...}`` (plain dicts); plain chains of
Linear / Conv2d are inferred (:func:`mergeforge.fusion.infer.infer_spec`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mergeforge.errors import ValidationError
from mergeforge.fusion.levels import eval_mode

Entry = str | tuple[str, int] | None

HOWTO = (
    "define `permutation_spec()` on the model, returning {'axes': {param: (group or None, one "
    "per axis)}, 'points': {group: ((module name, feature dim), ...)}} (see "
    "mergeforge.fusion.permspec and mergeforge.evaluate.vision.models for examples)"
)


def entry_group(entry: Entry) -> tuple[str, int] | None:
    """``(group, r)`` of an axis entry, None when the axis is not permuted."""
    if entry is None:
        return None
    if isinstance(entry, str):
        return entry, 1
    return entry[0], int(entry[1])


@dataclass(frozen=True)
class PermutationSpec:
    """``axes``: every parameter (state-dict key) → one entry per axis. ``points``: group →
    ``(module name, feature dim)`` pairs whose forward outputs carry the group's features
    (several points: their samples are concatenated, e.g. every block's residual stream).
    ``output_axis``: parameters whose *output-side* axis is not axis 0 (a ViT's CLS token and
    position table: their last axis), see :func:`apply_transforms`."""

    axes: Mapping[str, tuple[Entry, ...]]
    points: Mapping[str, tuple[tuple[str, int], ...]] = field(default_factory=dict)
    output_axis: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, entries in self.axes.items():
            for e in entries:
                ok = e is None or isinstance(e, str)
                ok = ok or (isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], str))
                if not ok or (isinstance(e, tuple) and int(e[1]) < 1):
                    raise ValidationError(
                        f"permutation spec: parameter {key!r} has axis entry {e!r}; use None, a "
                        "group name, or (group, r ≥ 1)"
                    )
        for group in self.points:
            if group not in self.groups:
                raise ValidationError(
                    f"permutation spec: points name group {group!r}, which acts on no axis"
                )
        for key, axis in self.output_axis.items():
            if key not in self.axes or entry_group(self.axes[key][axis]) is None:
                raise ValidationError(
                    f"permutation spec: output_axis {axis} of {key!r} is not a permuted axis"
                )

    @property
    def groups(self) -> tuple[str, ...]:
        """The groups in order of first appearance in ``axes`` (a model's forward order)."""
        seen: dict[str, None] = {}
        for entries in self.axes.values():
            for e in entries:
                if (g := entry_group(e)) is not None:
                    seen.setdefault(g[0], None)
        return tuple(seen)

    def m_axis(self, key: str) -> int | None:
        """The output-side axis of ``key`` (transformed by the merge matrix): ``output_axis``
        if listed, else axis 0 when it is permuted, else None (a parameter that only reads
        permuted features, like a classifier head)."""
        if key in self.output_axis:
            return self.output_axis[key]
        entries = self.axes[key]
        return 0 if entries and entries[0] is not None else None

    def widths(self, state: Mapping[str, torch.Tensor] | nn.Module) -> dict[str, int]:
        """Checks the spec against a state dict (or model) and returns each group's width."""
        model = state if isinstance(state, nn.Module) else None
        sd = state.state_dict() if isinstance(state, nn.Module) else state
        missing = [k for k, t in sd.items() if t.is_floating_point() and k not in self.axes]
        if missing:
            raise ValidationError(
                f"permutation spec: parameters {missing[:5]} are not listed; list every "
                "floating-point tensor (all-None entries for one that no group acts on)"
            )
        widths: dict[str, tuple[int, str]] = {}
        for key, entries in self.axes.items():
            if key not in sd:
                raise ValidationError(f"permutation spec: parameter {key!r} is not in the model")
            shape = tuple(sd[key].shape)
            if len(entries) != len(shape):
                raise ValidationError(
                    f"permutation spec: {key!r} has {len(shape)} axes {shape}, the spec "
                    f"{len(entries)} entries"
                )
            for size, e in zip(shape, entries, strict=True):
                if (g := entry_group(e)) is None:
                    continue
                group, r = g
                if size % r:
                    raise ValidationError(
                        f"permutation spec: {key!r} axis of size {size} is not channels × {r} "
                        f"for group {group!r}"
                    )
                w, first = widths.setdefault(group, (size // r, key))
                if w != size // r:
                    raise ValidationError(
                        f"permutation spec: group {group!r} has width {w} at {first!r} but "
                        f"{size // r} at {key!r}"
                    )
        if model is not None:
            names = {n for n, _ in model.named_modules()}
            for group, pts in self.points.items():
                for name, _ in pts:
                    if name not in names:
                        raise ValidationError(
                            f"permutation spec: point {name!r} of group {group!r} is not a "
                            "module of the model"
                        )
        return {g: w for g, (w, _) in widths.items()}


def spec_for(model: nn.Module) -> PermutationSpec:
    """The model's own ``permutation_spec()`` when it has one, else
    :func:`~mergeforge.fusion.infer.infer_spec`;
    checked against the model either way."""
    if callable(getattr(model, "permutation_spec", None)):
        raw = model.permutation_spec()
        if isinstance(raw, PermutationSpec):
            spec = raw
        else:
            try:
                spec = PermutationSpec(**raw)
            except TypeError as exc:
                raise ValidationError(
                    f"{type(model).__name__}.permutation_spec(): {exc}; {HOWTO}"
                ) from None
    else:
        # imported here: infer.py builds on this module's PermutationSpec
        from mergeforge.fusion.infer import infer_spec

        spec = infer_spec(model)
    spec.widths(model)
    return spec


def _split(t: torch.Tensor, axis: int, r: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``t`` with ``axis`` moved first and flattened to channels × (r · rest)."""
    moved = t.movedim(axis, 0)
    return moved.reshape(moved.shape[0] // r, -1), tuple(moved.shape)


def _join(flat: torch.Tensor, shape: tuple[int, ...], axis: int, r: int) -> torch.Tensor:
    return flat.reshape(flat.shape[0] * r, *shape[1:]).movedim(0, axis)


def transform_axis(t: torch.Tensor, axis: int, entry: Entry, mat: torch.Tensor) -> torch.Tensor:
    """``t`` with the channels of ``axis`` mapped by ``mat`` (w_new × w_old): new channel i =
    Σ_j mat[i, j] · old channel j (blockwise for a flattened ``(group, r)`` axis)."""
    _, r = entry_group(entry)
    flat, shape = _split(t, axis, r)
    return _join(mat.to(flat.dtype) @ flat, shape, axis, r)


def flat_rows(t: torch.Tensor, axis: int, entry: Entry) -> torch.Tensor:
    """The channels of ``axis`` as rows: w × (everything else)."""
    return _split(t, axis, entry_group(entry)[1])[0]


def permute_tensor(
    t: torch.Tensor,
    entries: Sequence[Entry],
    perms: Mapping[str, torch.Tensor],
    *,
    skip: int | None = None,
) -> torch.Tensor:
    """``t`` with every axis whose group is in ``perms`` permuted (new channel i = old channel
    ``perms[g][i]``), except axis ``skip``; a new tensor."""
    for axis, e in enumerate(entries):
        if axis != skip and (g := entry_group(e)) is not None and g[0] in perms:
            flat, shape = _split(t, axis, g[1])
            t = _join(flat[perms[g[0]].to(torch.int64)], shape, axis, g[1])
    return t.clone()


def permute(
    state: Mapping[str, torch.Tensor], spec: PermutationSpec, perms: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A permuted copy of ``state`` (see :func:`permute_tensor`); groups missing from ``perms``
    are left alone. The model's function is unchanged when the spec is right."""
    return {
        key: permute_tensor(t.detach(), spec.axes.get(key, ()), perms) for key, t in state.items()
    }


def apply_transforms(
    states: Sequence[Mapping[str, torch.Tensor]],
    spec: PermutationSpec,
    merge: Mapping[str, Sequence[torch.Tensor]],
    unmerge: Mapping[str, Sequence[torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """The fused state dict of N parents from per-group merge / unmerge matrices.

    The rule (ZipIt!'s ``M f(U x)``, 2305.03053 §4): for parent k and group g, ``merge[g][k]``
    is M_k (w × w_k), ``unmerge[g][k]`` is U_k (w_k × w). Each parameter is
    ``Σ_k W_k`` with its output-side axis (:meth:`PermutationSpec.m_axis`) mapped by M_k and
    every other permuted axis mapped by U_kᵀ; a parameter with no output-side permuted axis
    (a head reading permuted features, an unpermuted bias) is the mean (1/N) over k. For
    permutation matrices P_k (aligned parent k = P_k · parent k), M_k = P_k / N and U_k = P_kᵀ
    give exactly the mean of the aligned parents, ½(θ_A + π(θ_B)) for two. Computed in
    float64, returned in parent 0's dtypes; integer tensors are copied from parent 0.
    """
    n = len(states)
    for kind, mats in (("merge", merge), ("unmerge", unmerge)):
        for g in spec.groups:
            if g not in mats or len(mats[g]) != n:
                got = len(mats[g]) if g in mats else 0
                raise ValidationError(
                    f"apply_transforms: {kind} needs {n} matrices for group {g!r}, got {got}"
                )
    for g in spec.groups:
        for k, (m, u) in enumerate(zip(merge[g], unmerge[g], strict=True)):
            if m.ndim != 2 or tuple(u.shape) != (m.shape[1], m.shape[0]):
                raise ValidationError(
                    f"apply_transforms: group {g!r}, parent {k}: merge {tuple(m.shape)} and "
                    f"unmerge {tuple(u.shape)} must be w × w_k and w_k × w"
                )
    out: dict[str, torch.Tensor] = {}
    for key, ref in states[0].items():
        if not ref.is_floating_point():
            out[key] = ref.clone()
            continue
        entries = spec.axes.get(key, (None,) * ref.ndim)
        m_axis = spec.m_axis(key) if key in spec.axes else None
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for k, sd in enumerate(states):
            t = sd[key].detach().to("cpu", torch.float64)
            for axis, e in enumerate(entries):
                if (g := entry_group(e)) is None:
                    continue
                mat = merge[g[0]][k] if axis == m_axis else unmerge[g[0]][k].T
                t = transform_axis(t, axis, e, mat.to(torch.float64))
            acc += t
        if m_axis is None:
            acc /= n
        out[key] = acc.to(device=ref.device, dtype=ref.dtype)
    return out


def features(
    model: nn.Module,
    spec: PermutationSpec,
    inputs: torch.Tensor,
    *,
    batch_size: int = 256,
) -> dict[str, torch.Tensor]:
    """Each group's features on ``inputs``: rows = samples (× positions / pixels, × points),
    columns = the group's channels, float32 on the CPU. Forward hooks read the ``points``; the
    model runs in eval mode without gradients and every module's train/eval flag is restored
    afterwards."""
    missing = [g for g in spec.groups if not spec.points.get(g)]
    if missing:
        raise ValidationError(
            f"features: groups {missing} have no observation points; add them to the spec's "
            "'points' (module name, feature dim)"
        )
    if batch_size < 1:
        raise ValidationError(f"features: batch_size must be ≥ 1, got {batch_size}")
    chunks: dict[str, list[torch.Tensor]] = {g: [] for g in spec.groups}
    readers: dict[str, list[tuple[str, int]]] = {}
    for g in spec.groups:
        for name, dim in spec.points[g]:
            readers.setdefault(name, []).append((g, dim))

    def hook(name: str):
        def read(_module: nn.Module, _args: object, output: object) -> None:
            if not isinstance(output, torch.Tensor):
                raise ValidationError(f"features: module {name!r} does not return a tensor")
            for g, dim in readers[name]:
                x = output.detach().movedim(dim, -1)
                chunks[g].append(x.reshape(-1, x.shape[-1]).to("cpu", torch.float32))

        return read

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in readers]
    device = next(model.parameters()).device
    try:
        # each submodule's own flag comes back (model.train(was) would give every submodule
        # the top-level one)
        with eval_mode([model]), torch.no_grad():
            for start in range(0, len(inputs), batch_size):
                model(inputs[start : start + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
    return {g: torch.cat(c) for g, c in chunks.items()}


def aligned_mean_transforms(
    maps: Sequence[Mapping[str, torch.Tensor]],
) -> tuple[dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]]]:
    """Merge / unmerge matrices averaging N aligned parents: ``maps[k][g]`` = Q_k (w × w_k) maps
    parent k's channels of group g onto parent 0's (a permutation matrix, or OT-Fusion's
    normalised transport); parent 0 is the identity (``maps[0]`` is ignored). M_k = Q_k / N,
    U_k = Q_kᵀ, so :func:`apply_transforms` returns the mean of the aligned parents."""
    n = len(maps)
    if n < 2:
        raise ValidationError(f"aligned_mean_transforms: needs at least 2 parents, got {n}")
    merge: dict[str, list[torch.Tensor]] = {}
    unmerge: dict[str, list[torch.Tensor]] = {}
    for g, q1 in maps[1].items():
        eye = torch.eye(q1.shape[0], dtype=torch.float64)
        qs = [eye] + [maps[k][g].to(torch.float64) for k in range(1, n)]
        merge[g] = [q / n for q in qs]
        unmerge[g] = [q.T for q in qs]
    return merge, unmerge


def perm_matrix(perm: torch.Tensor) -> torch.Tensor:
    """P with P[i, perm[i]] = 1, so P @ x = x[perm] (float64)."""
    w = len(perm)
    return torch.eye(w, dtype=torch.float64)[perm.to(torch.int64)]
