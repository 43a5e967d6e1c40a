#!/usr/bin/env python
"""Memory and speed of the merge-ready optimizer (UMTAM) against ``torch.optim.AdamW``, in one run,
fine-tuning a text-suite backbone on one task exactly as the suite trains an expert
(:mod:`mergeforge.evaluate.text.experts`: whole encoder + linear head on mean-pooled embeddings,
two learning rates, weight decay, linear decay to zero, dropout on, seeded batches).

    python benchmarks/train/bench_optimizer.py                       # MiniLM, polarity, 30 steps
    python benchmarks/train/bench_optimizer.py --steps 10 --configs adamw umtam-stable
    python benchmarks/train/bench_optimizer.py --backbone smollm2 --steps 20

Configurations (``--configs``): ``adamw`` (the suite's optimizer), ``adamw+recorder`` (the same
AdamW with a :class:`~mergeforge.train.CurvatureRecorder` beside it, as the suite's
``adamw+recorder`` experts train: EMA R and C of every parameter; its state column counts the
recorder's R and C, its overhead is its step time over ``adamw``'s), ``umtam`` (the paper's
defaults: exact SVD every step), ``umtam-stable`` (the authors' stable variant: SVD every 10
steps, clamps), ``umtam-stable-feedback`` (the same, the gradients between refreshes kept in
E), ``umtam-randomized`` (paper defaults, randomized rank-32 SVD), ``umtam-subspace`` (the
same, each refresh after the first one warm-started subspace iteration). Every UMTAM
configuration keeps the recipe's learning rates (encoder 1e-4, head 3e-3) and weight decay, so
only the optimizer differs; every matrix (embeddings included) takes the factored path.

Each configuration runs in a fresh subprocess (``--child``) so its peak RSS is its own; it prints
one JSON line: optimizer state bytes at the end, peak RSS (``ru_maxrss``) and RSS before the
first step, the median and the mean (after the first) time of a whole step (forward, backward,
optimizer: the mean carries the refresh steps of ``svd_every`` > 1), the median of
``optimizer.step()`` alone, the first loss and the mean of the last five. Writes
``results/optimizer_BACKBONE.json`` and ``.md`` beside this script.

One torch thread by default (``--threads``): on a shared 2-core machine two threads stall each
other, LAPACK's SVD worst of all (a 384 × 1536 SVD took 0.5 s at two threads under load, 0.05 s
at one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = (
    "adamw",
    "adamw+recorder",
    "umtam",
    "umtam-stable",
    "umtam-stable-feedback",
    "umtam-randomized",
    "umtam-subspace",
)
RESULTS = Path(__file__).resolve().parent / "results"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_optimizer(name: str, groups: list[dict], weight_decay: float):
    import torch

    from mergeforge.train import UMTAM

    if name in ("adamw", "adamw+recorder"):
        plain = [{**g, "params": [p for _, p in g["params"]]} for g in groups]
        return torch.optim.AdamW(plain, weight_decay=weight_decay)
    if name == "umtam":
        return UMTAM(groups, weight_decay=weight_decay)
    if name == "umtam-stable":
        return UMTAM.stable(groups, weight_decay=weight_decay)
    if name == "umtam-stable-feedback":
        return UMTAM.stable(groups, weight_decay=weight_decay, between_refreshes="feedback")
    if name == "umtam-randomized":
        return UMTAM(groups, weight_decay=weight_decay, svd="randomized")
    if name == "umtam-subspace":
        return UMTAM(groups, weight_decay=weight_decay, svd="subspace")
    raise SystemExit(f"unknown configuration {name!r}; known: {CONFIGS}")


def state_bytes(opt) -> int:
    if hasattr(opt, "state_bytes"):
        return opt.state_bytes()
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values())


def child(args: argparse.Namespace) -> None:
    import torch
    from torch import nn
    from transformers import AutoTokenizer

    from mergeforge.evaluate.text.backbones import get_backbone
    from mergeforge.evaluate.text.eval import load_encoder, sentence_embedding, tokenize
    from mergeforge.evaluate.text.tasks import TEXT_TASKS

    torch.set_num_threads(args.threads)
    recipe = get_backbone(args.backbone).recipe
    task = TEXT_TASKS[args.task]()
    torch.manual_seed(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.base_dir)
    encoder = load_encoder(args.base_dir).train()
    head = nn.Linear(encoder.config.hidden_size, len(task.labels))
    groups = [
        {"params": list(encoder.named_parameters()), "lr": recipe.lr},
        {"params": [(f"head.{n}", p) for n, p in head.named_parameters()], "lr": recipe.head_lr},
    ]
    opt = make_optimizer(args.child, groups, recipe.weight_decay)
    recorder = None
    if args.child == "adamw+recorder":  # hooks AdamW's step: recording is inside opt.step()
        from mergeforge.train import CurvatureRecorder

        recorder = CurvatureRecorder(nn.ModuleDict({"encoder": encoder, "head": head}),
                                     optimizer=opt)  # fmt: skip
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / args.steps)
    gen = torch.Generator().manual_seed(recipe.seed)
    order: list[int] = []
    while len(order) < args.steps * recipe.batch_size:
        order += torch.randperm(len(task.train), generator=gen).tolist()

    rss_before = rss_bytes()
    step_s, opt_s, losses = [], [], []
    for step in range(args.steps):
        idx = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
        t0 = time.perf_counter()
        batch = tokenize(tokenizer, [task.train[i][0] for i in idx], max_length=recipe.max_length)
        logits = head(sentence_embedding(encoder, batch))
        loss = nn.functional.cross_entropy(logits, torch.tensor([task.train[i][1] for i in idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        schedule.step()
        step_s.append(t2 - t0)
        opt_s.append(t2 - t1)
        losses.append(loss.item())
    n_params = sum(p.numel() for p in encoder.parameters()) + sum(
        p.numel() for p in head.parameters()
    )
    recorder_floats = 0 if recorder is None else sum(recorder.state_floats().values())
    matrices = [p for p in [*encoder.parameters(), *head.parameters()] if p.ndim >= 2]
    print(json.dumps({
        "config": args.child,
        "recorder_bytes": 4 * recorder_floats,
        # the budget: 2 (m + n) floats per matrix (here R, C are m + n)
        "recorder_budget_bytes": 4 * 2 * sum(p.shape[0] + p[0].numel() for p in matrices),
        "steps": args.steps,
        "params": n_params,
        "state_bytes": state_bytes(opt) + 4 * recorder_floats,
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "step_median_s": statistics.median(step_s),
        "step_mean_s": statistics.fmean(step_s[1:]),  # the first step allocates the state
        "opt_step_median_s": statistics.median(opt_s),
        "first_loss": losses[0],
        "last5_loss": statistics.fmean(losses[-5:]),
        "losses": losses,
    }))  # fmt: skip


def table(rows: list[dict]) -> str:
    ref = next((r for r in rows if r["config"] == "adamw"), rows[0])
    mib = 1 << 20
    out = [
        "| optimizer | state MiB | ÷ AdamW | peak RSS MiB (training +) | step s median / mean "
        "| ÷ AdamW (mean) | optimizer.step s (median) | loss first → last 5 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['config']} | {r['state_bytes'] / mib:.1f} "
            f"| {r['state_bytes'] / ref['state_bytes']:.2f} | {r['peak_rss_bytes'] / mib:.0f} "
            f"(+{(r['peak_rss_bytes'] - r['rss_before_bytes']) / mib:.0f}) "
            f"| {r['step_median_s']:.2f} / {r['step_mean_s']:.2f} "
            f"| {r['step_mean_s'] / ref['step_mean_s']:.2f} "
            f"| {r['opt_step_median_s']:.3f} | {r['first_loss']:.3f} → {r['last5_loss']:.3f} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="minilm", choices=("minilm", "smollm2"))
    ap.add_argument("--task", default="polarity")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--stem", default=None,
                    help="results file stem under benchmarks/train/results (default "
                         "optimizer_<backbone>)")  # fmt: skip
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--base-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.child:
        child(args)
        return

    from mergeforge.evaluate.text.backbones import get_backbone

    rows = []
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        get_backbone(args.backbone).save(Path(tmp))  # the base as a Hugging Face folder, once
        for name in args.configs:
            cmd = [sys.executable, __file__, "--child", name, "--base-dir", tmp,
                   "--backbone", args.backbone, "--task", args.task, "--steps", str(args.steps),
                   "--threads", str(args.threads)]  # fmt: skip
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(f"{name}: {rows[-1]['step_median_s']:.2f} s/step", file=sys.stderr)
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "backbone": args.backbone,
        "task": args.task,
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, {args.threads} torch threads",
        "load_average": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d"),
        "wall_s": time.time() - started,
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / (args.stem or f"optimizer_{args.backbone}")
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    md = table(rows)
    stem.with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
