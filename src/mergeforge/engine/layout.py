"""Where the layers are: infer a checkpoint's repeated-block structure from tensor names.

mergekit ships one JSON architecture definition per model family; we infer the same facts from
names instead, so any transformer (Llama, GPT-2, BERT, Mistral, Qwen …) works without a table:
the layer container is the most common ``<prefix>.<index>.`` among the tensor names
(``model.layers.``, ``transformer.h.``, ``encoder.layer.`` …).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass

_LAYER = re.compile(r"^(?P<prefix>(?:[^.]+\.)*?[^.]+\.)(?P<idx>\d+)\.(?P<rest>.+)$")

# Non-layer tensors before the blocks (mergekit "pre_weights"); everything else is "post".
_PRE = re.compile(r"(embed|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings)")

NUM_LAYERS_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")

TIED_NAMES: dict[str, tuple[str, ...]] = {
    "lm_head.weight": (
        "model.embed_tokens.weight", "transformer.wte.weight", "wte.weight",
        "backbone.embeddings.weight", "model.language_model.embed_tokens.weight",
        "model.lm_head.weight", "shared.weight", "encoder.embed_tokens.weight",
        "decoder.embed_tokens.weight",
    ),
    "cls.predictions.decoder.weight": ("bert.embeddings.word_embeddings.weight",),
    "vocab_projector.weight": ("distilbert.embeddings.word_embeddings.weight",),
    "output.weight": ("model.tok_embeddings.weight",),
    "lm_head.decoder.weight": ("roberta.embeddings.word_embeddings.weight",),
    "decoder.embed_tokens.weight": (
        "shared.weight", "lm_head.weight", "encoder.embed_tokens.weight",
    ),
    "encoder.embed_tokens.weight": (
        "shared.weight", "lm_head.weight", "decoder.embed_tokens.weight",
    ),
}  # fmt: skip
"""Tied weights: a tensor a checkpoint may leave out because the model ties it to another
(``lm_head.weight`` -> ``model.embed_tokens.weight`` when ``tie_word_embeddings``), with the
names it may be stored under, first found wins. mergekit 0.1.5's architecture tables
(``tied_names``), merged over its architectures; tests/test_tied_embeddings.py checks the
match."""


def tied_source(name: str, names: Collection[str]) -> str | None:
    """The tensor a checkpoint with tensor names ``names`` stores ``name`` as, when it leaves
    ``name`` out because it is tied (mergekit's loader falls back the same way); ``None``
    when ``name`` is not a tied weight or none of its tied names is there."""
    return next((t for t in TIED_NAMES.get(name, ()) if t in names), None)


def heads_to_add(reference: Collection[str], others: Iterable[Collection[str]]) -> list[str]:
    """Tied weights the reference model leaves out (it stores what they are tied to) but some
    other input stores: the output gets them too, merged with each tied input's embedding in
    their place. mergekit's rule: an optional weight is written when any input has it."""
    others = list(others)
    return [
        name
        for name in TIED_NAMES
        if name not in reference
        and tied_source(name, reference) is not None
        and any(name in o for o in others)
    ]


@dataclass(frozen=True)
class Layout:
    prefix: str | None
    """Layer container prefix, e.g. ``model.layers.``; ``None`` when there are no layers."""
    num_layers: int

    def split(self, name: str) -> tuple[int, str] | None:
        """``model.layers.3.mlp.w`` -> ``(3, "mlp.w")``; ``None`` for non-layer tensors."""
        if self.prefix is None or not name.startswith(self.prefix):
            return None
        head, _, rest = name[len(self.prefix) :].partition(".")
        if not head.isdigit() or not rest:
            return None
        return int(head), rest

    def name(self, layer: int, rest: str) -> str:
        assert self.prefix is not None
        return f"{self.prefix}{layer}.{rest}"

    def t(self, name: str) -> float:
        """Depth of a tensor in [0, 1] for gradients: mergekit's ``idx / (n - 1)`` for layers,
        0 for embeddings, norms and heads (mergekit evaluates those at t = 0 too)."""
        s = self.split(name)
        if s is None:
            return 0.0
        return s[0] / (self.num_layers - 1) if self.num_layers > 1 else 1.0

    @staticmethod
    def is_pre(name: str) -> bool:
        return bool(_PRE.search(name))


def infer_layout(names: Iterable[str]) -> Layout:
    names = list(names)
    counts: Counter[str] = Counter()
    max_idx: dict[str, int] = {}
    for n in names:
        m = _LAYER.match(n)
        if m:
            p = m.group("prefix")
            counts[p] += 1
            max_idx[p] = max(max_idx.get(p, -1), int(m.group("idx")))
    if not counts:
        return Layout(prefix=None, num_layers=0)
    prefix, _ = counts.most_common(1)[0]
    return Layout(prefix=prefix, num_layers=max_idx[prefix] + 1)
