"""mergekit's ``modules:``: one merge per module of the architecture, planned into one plan.

mergekit describes every architecture as modules. Most have one, named ``default`` (the whole
model); its multi-module architectures (VLMs: text decoder, vision tower, projector; T5 and
Whisper: encoder, decoder) are :data:`mergeforge.config.MERGEKIT_MODULES`, where a tensor
belongs to the module with the longest matching name prefix. A module is merged as a whole
config would be, restricted to its tensors: its own ``models`` or ``slices`` (layer ranges
count the module's own layers, e.g. the vision tower's blocks), gradients over its own depth,
and its ``parameters`` between the slice's and the global ones in precedence. Slices that
change a module's depth set its layer count in the output's config.json
(``text_config.num_hidden_layers``).

Checked here, naming the fix: a module name the model does not have (with the ones it has),
a module left out (mergekit would write a model without its tensors), and a tensor of the
reference model that belongs to no module (mergekit would drop it).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from mergeforge.checkpoint import Checkpoint
from mergeforge.config import CONFIG_DOCS, MERGEKIT_MODULES, MergeConfig
from mergeforge.engine.layout import heads_to_add, infer_layout
from mergeforge.errors import ConfigError, ValidationError
from mergeforge.methods import get_method

DEFAULT = "default"
"""The one module of every architecture that is not in :data:`MERGEKIT_MODULES`."""


def architecture(ck: Checkpoint) -> str | None:
    """``architectures[0]`` of a checkpoint's config.json, or ``None`` without one."""
    archs = (ck.config or {}).get("architectures")
    return str(archs[0]) if isinstance(archs, list) and archs else None


def module_owner(arch: str | None) -> Callable[[str], str | None]:
    """tensor name -> the module it belongs to (``None``: none of them) for ``arch``."""
    table = MERGEKIT_MODULES.get(arch or "")
    if table is None:
        return lambda _name: DEFAULT
    prefixes = sorted(
        ((p, mod) for mod, (ps, _) in table.items() for p in ps), key=lambda x: -len(x[0])
    )

    @functools.cache
    def owner(name: str) -> str | None:
        return next((mod for p, mod in prefixes if name.startswith(p)), None)

    return owner


_INDEX = re.compile(r"\.(\d+)\.")


def stack_depth(names: Iterable[str]) -> Callable[[str], float]:
    """tensor name -> its depth t in [0, 1] for gradients, over its own layer stack: the part
    of the name before its first ``.N.`` is the stack, t = N / (layers of that stack - 1) (1.0
    for a one-layer stack), 0 for a tensor in no stack (embeddings, norms, heads). mergekit
    merges ``models:`` module by module, each over its own layers, and infers a module per
    stack for architectures it has no table for (a VLM's vision blocks, an encoder and a
    decoder); with one stack this is :meth:`Layout.t`."""
    counts: dict[str, int] = {}
    for n in names:
        if m := _INDEX.search(n):
            counts[n[: m.start()]] = max(counts.get(n[: m.start()], 0), int(m[1]) + 1)

    def depth(name: str) -> float:
        m = _INDEX.search(name)
        if m is None or name[: m.start()] not in counts:
            return 0.0
        n = counts[name[: m.start()]]
        return int(m[1]) / (n - 1) if n > 1 else 1.0

    return depth


def module_names(arch: str | None) -> list[str]:
    """The module names ``modules:`` may use for ``arch`` (mergekit's)."""
    table = MERGEKIT_MODULES.get(arch or "")
    return list(table) if table is not None else [DEFAULT]


def _check_names(cfg: MergeConfig, arch: str | None, ref_model: str) -> None:
    known = module_names(arch)
    what = f"{ref_model} ({arch or 'no config.json architecture'})"
    for mod in cfg.modules:
        if mod.name not in known:
            alt = (
                "" if len(known) > 1 else
                " mergekit names the one module of a single-module architecture 'default'; or "
                "use the top-level 'models:' / 'slices:'."
            )  # fmt: skip
            raise ConfigError(
                f"modules.{mod.name}: {what} has no module {mod.name!r}; its modules (as "
                f"mergekit 0.1.5 names them): {', '.join(known)}.{alt} See {CONFIG_DOCS}."
            )
    missing = [k for k in known if k not in {m.name for m in cfg.modules}]
    if missing:
        raise ConfigError(
            f"modules: {', '.join(missing)} of {what} not listed; mergekit would write a model "
            f"without {'its' if len(missing) == 1 else 'their'} tensors. List every module "
            f"({', '.join(known)}), e.g. '{missing[0]}: {{models: [{{model: BASE}}]}}' to keep "
            "one model's weights there."
        )


def plan_modules(
    cfg: MergeConfig,
    models: Sequence[str],
    cks: Sequence[Checkpoint],
    index: dict[str, int],
    ref: int,
    add: Callable[..., None],
) -> tuple[int | None, dict[str, int], list[str]]:
    """Plan every module of ``cfg.modules`` through the planner's ``add`` (one call per output
    tensor). Returns (the output's layer count for the top-level config keys, or ``None``;
    module layer counts by model-config key; the tied weights added to the output)."""
    from mergeforge.engine.plan import _plan_slices

    ref_ck = cks[ref]
    arch = architecture(ref_ck)
    _check_names(cfg, arch, models[ref])
    owner = module_owner(arch)
    table = MERGEKIT_MODULES.get(arch or "")
    method = get_method(cfg.merge_method)
    base = index[cfg.base_model] if cfg.base_model else None

    inputs = {index[s.model] for mod in cfg.modules for s in mod.models}
    inputs |= {index[s.model] for mod in cfg.modules for sl in mod.slices for s in sl.sources}
    added = heads_to_add(set(ref_ck.keys()), [set(cks[m].keys()) for m in sorted(inputs)])
    names = [*ref_ck.keys(), *added]
    orphans = [n for n in names if owner(n) is None]
    if orphans:
        raise ValidationError(
            f"modules: {models[ref]} has tensors in no module of {arch} as mergekit 0.1.5 "
            f"defines them (e.g. {', '.join(map(repr, orphans[:3]))}); mergekit would leave "
            "them out of the output. Merge this model with the top-level 'models:' instead."
        )

    num_out_layers: int | None = None
    module_layers: dict[str, int] = {}
    for mod in cfg.modules:
        mine = [n for n in names if owner(n) == mod.name]
        if not mine:
            raise ValidationError(
                f"modules.{mod.name}: {models[ref]} has no tensors of this module (names "
                f"starting with {', '.join(table[mod.name][0]) if table else '...'}); check "
                "that the models are of the architecture their config.json names."
            )
        layout = infer_layout(n for n in mine if n not in added)
        depth = stack_depth(n for n in mine if n not in added)
        add_m: Callable[..., Any] = functools.partial(add, module_params=mod.parameters)
        where = f"modules.{mod.name}"
        if mod.models:
            sources = [(index[m.model], m.parameters) for m in mod.models]
            if base is not None and method.base != "none" and base not in [s[0] for s in sources]:
                sources.append((base, {}))
            for name in mine:
                add_m(name, lambda m, n=name: n, sources, {}, None, depth(name),
                      f"{where}.models")  # fmt: skip
            continue
        n_out = _plan_slices(
            cfg, models, cks, index, layout, ref_ck, add_m,
            [n for n in added if owner(n) == mod.name], slices=mod.slices,
            names=[n for n in mine if n not in added],
            member=lambda k, name=mod.name: owner(k) == name, where=f"{where}.slices",
        )  # fmt: skip
        if table is None:
            num_out_layers = n_out  # the whole model's: config.json's num_hidden_layers
        elif table[mod.name][1] is not None:
            module_layers[table[mod.name][1]] = n_out
    return num_out_layers, module_layers, added
