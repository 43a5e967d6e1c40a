"""What a run leaves in its folder: ``results.json`` (settings, every round, the summary),
``accuracy.png`` (test accuracy per round) and ``model.safetensors`` (the final global model).
Each is written atomically (``checkpoint/atomic.py``): a killed run never leaves half a file."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mergeforge.checkpoint.atomic import atomic_file, write_text_atomic


def summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Initial, final and best test accuracy (best over rounds 1.., the earliest on a tie)."""
    trained = [r for r in rows if r["round"] > 0]
    best = max(trained, key=lambda r: r["accuracy"]) if trained else None
    return {
        "initial_accuracy": rows[0]["accuracy"] if rows and rows[0]["round"] == 0 else None,
        "final_accuracy": trained[-1]["accuracy"] if trained else None,
        "best_accuracy": best["accuracy"] if best else None,
        "best_round": best["round"] if best else None,
        "dropped": sum(len(r["dropped"]) for r in trained),
    }


def write_results(path: Path, doc: Mapping[str, Any]) -> None:
    write_text_atomic(path, json.dumps(doc, indent=1, default=str) + "\n")


def write_model(
    path: Path, state_dict: Mapping[str, torch.Tensor], meta: Mapping[str, str]
) -> None:
    from safetensors.torch import save_file

    sd = {k: t.detach().contiguous().cpu() for k, t in state_dict.items()}
    with atomic_file(path) as tmp:
        save_file(sd, str(tmp), metadata=dict(meta))


def plot_accuracy(path: Path, curves: Mapping[str, Sequence[Mapping[str, Any]]], *,
                  title: str = "") -> None:  # fmt: skip
    """Test accuracy per round, one line per run (``label -> rows``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, rows in curves.items():
        ax.plot([r["round"] for r in rows], [100 * r["accuracy"] for r in rows], ".-", label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "mergeforge federated")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
