"""Per-model statistics that data-using merge methods read: RegMean input Grams (forward hooks,
:mod:`.grams`) and the diagonal Fisher (:mod:`.fisher`), computed once per model by running it on
data (``mergeforge stats``: :mod:`.hf`; or a bench suite) and written as the model's sidecar
(:mod:`mergeforge.checkpoint.sidecar`). Below the engine: it never imports it."""

from mergeforge.stats.fisher import diagonal_fisher
from mergeforge.stats.grams import GramRecorder, compute_grams

__all__ = ["GramRecorder", "compute_grams", "diagonal_fisher"]
