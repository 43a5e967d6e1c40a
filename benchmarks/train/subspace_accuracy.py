#!/usr/bin/env python
"""How well UMTAM's momentum refreshes keep the top-r factors of a drifting momentum
(BENCHMARKS.md §6): an EMA (β₁ 0.9) of noisy gradients G_t = A + noise, A of rank 40 with a
decaying spectrum, factored every step at rank 16 by the exact SVD, the randomized range finder
(2 power iterations) and the warm-started subspace iteration (``svd="subspace"``: one iteration
from the previous V). Prints the relative truncation error ‖M − U Σ Vᵀ‖ / ‖M‖ every 5 steps.

    python benchmarks/train/subspace_accuracy.py
"""

from __future__ import annotations

import argparse

import torch

from mergeforge.train.optimizer import truncated_svd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="300,200")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--noise", type=float, default=0.3)
    a = ap.parse_args()
    m, n = (int(x) for x in a.shape.split(","))
    torch.manual_seed(0)
    signal = torch.randn(m, 40) @ torch.diag(torch.logspace(0, -2, 40)) @ torch.randn(40, n)
    noise = [torch.randn(m, n) * signal.std() * a.noise for _ in range(a.steps)]
    for method in ("exact", "randomized", "subspace"):
        mom, v, errs = torch.zeros(m, n), None, []
        for t in range(a.steps):
            mom = 0.9 * mom + 0.1 * (signal + noise[t])
            u, s, v = truncated_svd(mom, a.rank, method=method, oversample=8, power_iters=2,
                                    seed=t, start=v)  # fmt: skip
            errs.append(float((mom - (u * s) @ v.mT).norm() / mom.norm()))
        every = " ".join(f"{e:.4f}" for e in errs[::5])
        print(f"{method:>10}: {every} | end {errs[-1]:.4f}")


if __name__ == "__main__":
    main()
