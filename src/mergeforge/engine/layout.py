"""Where the layers are: infer a checkpoint's repeated-block structure from tensor names.

mergekit ships one JSON architecture definition per model family; we infer the same facts from
names instead, so any transformer (Llama, GPT-2, BERT, Mistral, Qwen …) works without a table:
the layer container is the most common ``<prefix>.<index>.`` among the tensor names
(``model.layers.``, ``transformer.h.``, ``encoder.layer.`` …).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

_LAYER = re.compile(r"^(?P<prefix>(?:[^.]+\.)*?[^.]+\.)(?P<idx>\d+)\.(?P<rest>.+)$")

# Non-layer tensors before the blocks (mergekit "pre_weights"); everything else is "post".
_PRE = re.compile(r"(embed|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings)")

NUM_LAYERS_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


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
