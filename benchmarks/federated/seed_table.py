"""Mean ± std over seeds of ``bench_federated.py`` runs (one results folder per seed).

    python benchmarks/federated/seed_table.py \
        benchmarks/federated/results/table-full-a0.1-mnist \
        benchmarks/federated/results/table-full-a0.1-mnist-s1 \
        benchmarks/federated/results/table-full-a0.1-mnist-s2

Reads each folder's ``federated.json`` and prints, per (dataset, regime), one row per aggregator:
the final accuracy per seed, its mean ± sample std, the margin over FedAvg's final accuracy
seed by seed (and its mean), and in how many seeds the aggregator beats FedAvg by ≥ 2 points
(issue 17's target at α = 0.1). ``--last K``: the same table of the mean accuracy over the last K
rounds (one bad last round moves a non-IID run by 15 points). Folders must differ in seed and
agree on everything else.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

TARGET = 2.0  # points over FedAvg (issue 17)
SAME = ("clients", "rounds", "local_epochs", "lr", "batch_size", "arch", "n_train", "n_test")


def load(folders: list[str], last: int = 0) -> tuple[list[int], dict]:
    """``seeds`` (in the given order) and ``{(dataset, regime): {aggregator: [final % per
    seed]}}`` (``last`` > 0: the mean % of the last ``last`` rounds); a run missing in one seed
    leaves ``None`` in its place."""
    docs = [json.loads((Path(f) / "federated.json").read_text()) for f in folders]
    seeds = [d["settings"]["seed"] for d in docs]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(
            f"two folders have the same seed: {dict(zip(folders, seeds, strict=True))}"
        )
    for key in SAME:
        vals = {d["settings"].get(key) for d in docs}
        if len(vals) > 1:
            raise SystemExit(f"the folders differ in {key}: {sorted(map(str, vals))}")
    table: dict = {}
    for i, d in enumerate(docs):
        for r in d["runs"]:
            row = table.setdefault((r["dataset"], r["regime"]), {}).setdefault(
                r["aggregator"], [None] * len(docs)
            )
            if last:
                acc = [x["accuracy"] for x in r["rows"]][-last:]
                row[i] = 100 * sum(acc) / len(acc)
            else:
                row[i] = 100 * r["final"]
    return seeds, table


def _ms(xs: list[float]) -> str:
    if len(xs) < 2:
        return f"{xs[0]:.2f}"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def markdown(seeds: list[int], table: dict, what: str = "final accuracy %") -> str:
    lines = []
    for (ds, regime), rows in table.items():
        fed = rows.get("fedavg")
        lines += ["", f"**{ds}, {regime}** ({what}, seeds {', '.join(map(str, seeds))})",
                  "", "| aggregator | " + " | ".join(f"seed {s}" for s in seeds)
                  + " | mean ± std | − FedAvg per seed | mean margin | seeds ≥ +2 |",
                  "|---|" + "---:|" * (len(seeds) + 4)]  # fmt: skip
        for agg, xs in rows.items():
            done = [x for x in xs if x is not None]
            cells = ["" if x is None else f"{x:.2f}" for x in xs] + [_ms(done) if done else ""]
            if fed and agg != "fedavg":
                m = [x - f for x, f in zip(xs, fed, strict=True) if None not in (x, f)]
                cells += [" / ".join(f"{v:+.2f}" for v in m),
                          f"{statistics.mean(m):+.2f}" if m else "",
                          f"{sum(v >= TARGET for v in m)}/{len(m)}"]  # fmt: skip
            else:
                cells += ["", "", ""]
            lines.append(f"| {agg} | " + " | ".join(cells) + " |")
    return "\n".join(lines).lstrip() + "\n"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", help="bench_federated.py --out folders, one per seed")
    p.add_argument("--last", type=int, default=0, help="mean accuracy of the last K rounds")
    a = p.parse_args(argv)
    what = f"mean accuracy % of the last {a.last} rounds" if a.last else "final accuracy %"
    text = markdown(*load(a.folders, a.last), what)
    print(text, end="")
    return text


if __name__ == "__main__":
    main()
