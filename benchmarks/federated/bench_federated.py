#!/usr/bin/env python
"""The federated table of issue 17: merge methods as Flower aggregators against FedAvg.

For each dataset and partition regime (IID, Dirichlet α per ``--alphas``), every aggregator
trains the same MLP from the same initial model on the same client partitions
(``mergeforge.federated.run_federated``: Flower's ``run_simulation`` on Ray, one CPU a
client, or ``--in-process``). Aggregators (``AGGREGATORS``): FedAvg, FedProx (μ on the
clients), task arithmetic (λ = 1.5: the example-weighted mean update, extrapolated; λ = 1 is
FedAvg exactly), TIES, DARE-TIES, two covariance merges (SWUDI-A, data-free; RegMean, with
the input Grams each client sends), coordinate median and trimmed mean (β = 0.2).
Reported: final and best test accuracy, the round of the best, wall time; per-round
accuracy plots (one per dataset × regime). ``--scaled-client F`` makes client 0 send
θ_g + F·(θ_k − θ_g) every round (a hostile ×F update), to measure the damage per aggregator.

Outputs in ``--out`` (default benchmarks/federated/results): ``federated[-scaledF].json``
(every run's settings and rows), ``.md`` (the table), ``<dataset>-<regime>.png``, and each
run's own folder (results.json, accuracy.png, model.safetensors).

    # the issue's table (Fashion-MNIST and MNIST, 10 clients, 20 rounds, α 0.1 / 0.5 / IID)
    python benchmarks/federated/bench_federated.py
    python benchmarks/federated/bench_federated.py --scaled-client 100
    # the text configuration: one MiniLM client per text task (3 tasks), 5 rounds
    OMP_NUM_THREADS=2 python benchmarks/federated/bench_federated.py --datasets text \
        --rounds 5 --n-train 256 --in-process --out benchmarks/federated/results/text
    # a smoke run (2 clients, 2 rounds, UCI digits, in process)
    OMP_NUM_THREADS=1 python benchmarks/federated/bench_federated.py --datasets digits \\
        --clients 2 --rounds 2 --alphas 0.5 --n-train 400 --in-process --out /tmp/fed-smoke
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch

from mergeforge.checkpoint.atomic import write_text_atomic
from mergeforge.federated import make_client_app, run_federated
from mergeforge.federated.report import plot_accuracy

AGGREGATORS = {
    "fedavg": "fedavg",
    "fedprox": {"name": "fedprox", "mu": 0.01},
    "task_arithmetic": {"method": "task_arithmetic", "parameters": {"lambda": 1.5}},
    "ties": {"method": "ties", "model_parameters": {"density": 0.5}},
    "dare_ties": {"method": "dare_ties", "model_parameters": {"density": 0.5}},
    "swudi_a": {"method": "swudi_a"},
    "regmean": {"method": "regmean"},
    "median": {"name": "median"},
    "trimmed_mean": {"name": "trimmed_mean", "beta": 0.2},
    "neuron_fusion": {"name": "neuron_fusion"},
    "neuron_fusion_reported": {
        "name": "neuron_fusion",
        "parameters": {"class_fractions": "reported"},
    },
}
RIDGES = {
    f"neuron_fusion_r{r:g}": {"name": "neuron_fusion", "parameters": {"ridge": r}}
    for r in (1e-10, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1)
} | {
    f"neuron_fusion_n{n}_r{r:g}": {
        "name": "neuron_fusion",
        "parameters": {"ridge": r, "fusion_examples": n},
    }
    for n in (1000, 2000)
    for r in (1e-4, 1e-3)
}
"""The aggregator's ridge and fusion-set sweeps (``--aggregators neuron_fusion_r1e-06
neuron_fusion_n1000_r0.001 ...``), not in the default table."""


def scale_update(pid, rnd, sd, global_sd, *, client: int, factor: float):
    """Client ``client`` sends θ_g + factor·(θ_k − θ_g): a hostile, scaled update."""
    if pid != client:
        return sd
    return {k: g + factor * (sd[k] - g) if g.is_floating_point() else sd[k]
            for k, g in global_sd.items()}  # fmt: skip


def regimes(alphas: list[float], iid: bool) -> dict[str, dict]:
    out = {"iid": {"kind": "iid"}} if iid else {}
    out.update({f"dir{a:g}": {"kind": "dirichlet", "alpha": a} for a in alphas})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["fashion_mnist", "mnist"])
    ap.add_argument("--aggregators", nargs="+", default=list(AGGREGATORS),
                    choices=[*AGGREGATORS, *RIDGES])  # fmt: skip
    ap.add_argument("--alphas", nargs="*", type=float, default=[0.1, 0.5])
    ap.add_argument("--no-iid", action="store_true", help="leave the IID regime out")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--arch", default="mlp")
    ap.add_argument("--n-train", type=int, default=None, help="training subsample (default all)")
    ap.add_argument("--n-test", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scaled-client", type=float, default=None, metavar="F",
                    help="client 0 sends its update scaled by F (e.g. 100)")  # fmt: skip
    ap.add_argument("--in-process", action="store_true", help="no Ray: clients in turn")
    ap.add_argument("--num-cpus", type=int, default=None, help="Ray's CPUs (default: all)")
    ap.add_argument("--tasks", nargs="+", default=None,
                    help="text runs (--datasets text): the tasks, one client each")  # fmt: skip
    ap.add_argument("--text-lr", type=float, default=1e-4, help="text runs: the encoder's lr")
    ap.add_argument("--out", default="benchmarks/federated/results")
    args = ap.parse_args()

    out = Path(args.out)
    tag = "federated" + (f"-scaled{args.scaled_client:g}" if args.scaled_client else "")
    app = None
    if args.scaled_client:
        app = make_client_app(functools.partial(scale_update, client=0,
                                                factor=args.scaled_client))  # fmt: skip
    runs, lines, task_lines = [], [], []
    for dataset in args.datasets:
        text = dataset == "text"
        for regime, part in ({"tasks": None} if text else
                             regimes(args.alphas, not args.no_iid)).items():  # fmt: skip
            curves = {}
            for name in args.aggregators:
                agg = {**AGGREGATORS, **RIDGES}[name]
                if text and name.startswith("neuron_fusion"):
                    print(f"skipped {name}: not available to text runs (README)", flush=True)
                    continue
                cfg = {"dataset": dataset, "rounds": args.rounds,
                       "local_epochs": args.local_epochs, "batch_size": args.batch_size,
                       "n_train": args.n_train, "n_test": args.n_test, "seed": args.seed,
                       "evaluate_clients": False, "aggregator": agg}  # fmt: skip
                if text:  # one client per task; the text suite's recipe
                    cfg |= {"lr": args.text_lr, **({"tasks": args.tasks} if args.tasks else {})}
                else:
                    cfg |= {"arch": args.arch, "clients": args.clients, "partition": part,
                            "lr": args.lr}  # fmt: skip
                t0 = time.perf_counter()
                res = run_federated(cfg, out=out / tag / dataset / regime / name,
                                    progress=False, client_app=app,
                                    in_process=args.in_process,
                                    num_cpus=args.num_cpus)  # fmt: skip
                wall = time.perf_counter() - t0
                curves[name] = res.rows
                runs.append({"dataset": dataset, "regime": regime, "aggregator": name,
                             "config": cfg, "final": res.final_accuracy, "best": res.best_accuracy,
                             "best_round": res.best_round, "wall_s": round(wall, 1),
                             "rounds_s": res.rows[-1]["seconds"], "rows": res.rows})  # fmt: skip
                best = f"{100 * res.best_accuracy:.2f} ({res.best_round})"
                lines.append(f"| {dataset} | {regime} | {name} | "
                             f"{100 * res.final_accuracy:.2f} | {best} | {wall:.0f} |")  # fmt: skip
                print(lines[-1], flush=True)
                if text:
                    per = res.rows[-1]["tasks"]
                    if not task_lines:
                        task_lines += ["", "Text run, each task's final test accuracy %:", "",
                                       "| aggregator | " + " | ".join(per) + " | mean |",
                                       "|---|" + "---:|" * (len(per) + 1)]  # fmt: skip
                    task_lines.append(f"| {name} | " + " | ".join(
                        f"{100 * a:.1f}" for a in per.values()
                    ) + f" | {100 * res.final_accuracy:.1f} |")  # fmt: skip
            if not curves:  # every aggregator skipped
                continue
            hostile = f", client 0 x{args.scaled_client:g}" if args.scaled_client else ""
            title = (f"text: {len(res.rows[-1]['tasks'])} tasks, one MiniLM client each" if text
                     else f"{dataset}, {args.clients} clients, {regime}{hostile}")  # fmt: skip
            plot_accuracy(out / f"{tag}-{dataset}-{regime}.png", curves, title=title)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    settings["torch_threads"] = torch.get_num_threads()
    write_text_atomic(out / f"{tag}.json", json.dumps({"settings": settings, "runs": runs},
                                                      indent=1, default=str) + "\n")  # fmt: skip
    head = ["| dataset | regime | aggregator | final acc. % | best acc. % (round) | wall s |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    write_text_atomic(out / f"{tag}.md", "\n".join([*head, *lines, *task_lines]) + "\n")
    print(f"wrote {out / (tag + '.json')}, {out / (tag + '.md')} and the plots")


if __name__ == "__main__":
    main()
