"""Per-model statistics that data-using merge methods read: RegMean input Grams and diagonal
Fisher, computed once per model (``mergeforge stats``) and saved beside it (:mod:`.store`)."""

from mergeforge.stats.fisher import diagonal_fisher
from mergeforge.stats.grams import GramRecorder, compute_grams
from mergeforge.stats.store import open_stats, save_stats, stats_path, weights_fingerprint

__all__ = [
    "GramRecorder",
    "compute_grams",
    "diagonal_fisher",
    "open_stats",
    "save_stats",
    "stats_path",
    "weights_fingerprint",
]
