#!/usr/bin/env python
"""Sanity check of the fusion methods on UCI digits: two parents per family, trained to a plateau.

Two parents of each architecture (MLP, VGG, ResNet, ViT; :mod:`mergeforge.evaluate.vision.models`)
are trained from different seeds on the same 1,437 digits (Adam 1e-3, cosine decay, batch 64,
``--steps`` steps, 1 thread), then fused zero-shot (no fine-tuning after fusion) on 400 of their
training images; every model is scored on the 360 held-out digits. Rows: each parent, plain
weight averaging, KF (closed form where possible; ``kf_normalized``: grouping on L2-normalised
activations, the v1 code's ViT option), HF, KF-gradient (2507.00037; also with the defaults it
had before this check, ``kf_gradient_kl50``: KL at the head, 50 epochs a level),
OT-Fusion (1910.05653) with uniform, Conductance and DeepLIFT marginals, and the output
ensemble (mean softmax). ``<row>_s``: fusion seconds. Everything is seeded; the whole run takes a
few minutes on one core.

    OMP_NUM_THREADS=1 python benchmarks/vision/fusion_sanity.py
    OMP_NUM_THREADS=1 python benchmarks/vision/fusion_sanity.py --archs resnet --steps 100
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mergeforge.evaluate.vision.data import load_digits
from mergeforge.evaluate.vision.train import (
    ensemble_probs,
    load_into,
    new_parent,
    predict_logits,
    train_model,
)
from mergeforge.fusion import FusionData, fuse

METHODS = {
    "average": ("average", {}),
    "kf": ("kf", {}),
    "kf_normalized": ("kf", {"normalize_acts": True}),  # the v1 code's ViT grouping
    "hf": ("hf", {}),
    "kf_gradient": ("kf_gradient", {}),
    # the defaults before this check: KL at the head, 50 epochs a level
    "kf_gradient_kl50": ("kf_gradient", {"head_loss": "kl", "epochs": 50, "head_epochs": 50}),
    "ot_fusion": ("ot_fusion", {}),
    "ot_fusion_c": ("ot_fusion", {"importance": "conductance"}),
    "ot_fusion_d": ("ot_fusion", {"importance": "deeplift"}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=["mlp", "vgg", "resnet", "vit"])
    ap.add_argument("--steps", type=int, default=600, help="optimizer steps per parent")
    ap.add_argument("--fusion-size", type=int, default=400)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--json", help="also write the numbers here (e.g. results/fusion-sanity.json)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_digits(seed=0)
    fusion = FusionData(data.train_x[: args.fusion_size], data.train_y[: args.fusion_size])
    results: dict[str, dict[str, float]] = {}
    start = time.perf_counter()

    def acc(logits: torch.Tensor) -> float:
        return round(float((logits.argmax(1) == data.test_y).float().mean()), 4)

    for arch in args.archs:
        row: dict[str, float] = {}
        parents = []
        for k in range(2):
            m = new_parent(arch, seed=k)
            train_model(
                m, data.train_x, data.train_y, epochs=10**6, batch_size=64, lr=1e-3, seed=k,
                max_steps=args.steps, schedule="cosine",
            )  # fmt: skip
            parents.append(m.eval())
            row[f"parent{k}"] = acc(predict_logits(m, data.test_x))
        row["ensemble"] = acc(ensemble_probs([predict_logits(p, data.test_x) for p in parents]))
        for name in args.methods:
            method, params = METHODS[name]
            t = time.perf_counter()
            state = fuse(parents, fusion, method, params)
            row[name] = acc(predict_logits(load_into(arch, state), data.test_x))
            row[f"{name}_s"] = round(time.perf_counter() - t, 1)
        results[arch] = row
        print(arch, json.dumps(row), flush=True)
    total = round(time.perf_counter() - start, 1)
    print(f"total {total} s")
    if args.json:
        meta = {"steps": args.steps, "fusion_size": args.fusion_size, "total_s": total}
        with open(args.json, "w") as f:
            json.dump({**meta, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
