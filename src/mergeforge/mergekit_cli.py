"""mergekit's command line on ``mergeforge merge`` (and ``mergeforge-yaml``).

Every option of ``mergekit-yaml`` (mergekit 0.1.5) is accepted with the meaning it has there,
so a script keeps working when only the executable name changes. Options that change what is
written are honoured (``--cuda``, ``--device``, ``--out-shard-size``, ``--[no-]copy-tokenizer``,
``--[no-]write-model-card``, ``--random-seed``, ``--num-threads``, ``--transformers-cache``,
``--quiet``, ``-v``); options about how mergekit executes, which mergeforge does its own way,
are accepted with a one-line note on stderr saying what mergeforge does instead (see
:data:`NOTES`); ``--unsafe-truncate-embeddings``, which would change the output in a way
mergeforge cannot honour, is refused. README.md has the same table for users.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from mergeforge.errors import ConfigError

BOOL_FLAGS = (
    "allow-crimes",
    "unsafe-truncate-embeddings",
    "cuda",
    "low-cpu-memory",
    "copy-tokenizer",
    "clone-tensors",
    "trust-remote-code",
    "lazy-unpickle",
    "write-model-card",
    "safe-serialization",
    "quiet",
    "read-to-gpu",
    "multi-gpu",
    "async-write",
)
"""mergekit's ``--x/--no-x`` options (all default false but copy-tokenizer, write-model-card
and safe-serialization)."""

_WRITES = (
    "the merging threads write each tensor straight into its shard, overlapping the writes "
    "with the arithmetic"
)

NOTES: dict[str, tuple[Any, str]] = {
    "allow_crimes": (
        True,
        "mergeforge merges models whose tensors match by name and shape, "
        "and still refuses models whose config.json model_type differs",
    ),
    "lazy_unpickle": (
        True,
        "mergeforge always reads lazily, one tensor at a time "
        "(safetensors memory-mapped, .bin with torch.load(weights_only=True))",
    ),
    "trust_remote_code": (
        True,
        "mergeforge never runs a model's code (it reads config.json "
        "and the tensors only), so there is nothing to trust",
    ),
    "low_cpu_memory": (
        True,
        "mergeforge streams one tensor at a time, so memory is already "
        "bounded; results go to the output as they are computed",
    ),
    "read_to_gpu": (True, "tensors are moved to --device as they are read"),
    "multi_gpu": (True, "mergeforge runs on one device (--device)"),
    "gpu_rich": (
        True,
        "mergeforge runs on one GPU (--device cuda), streaming one tensor at a time",
    ),
    "clone_tensors": (True, "mergeforge writes every tensor on its own; nothing to clone"),
    "async_write": (True, _WRITES),
    "write_threads": (None, _WRITES),
    "lora_merge_cache": (
        None,
        "adapters (BASE+ADAPTER) are applied on the fly as tensors are read; nothing is cached",
    ),
    "lora_merge_dtype": (
        None,
        "adapters are applied in float32 and rounded once to the base model's dtype",
    ),
    "safe_serialization": (
        False,
        "mergeforge writes safetensors only (transformers loads "
        "them like .bin); the output is safetensors",
    ),
}
"""dest -> (the value that triggers the note, or None for "given at all"; what mergeforge
does instead)."""


def add_mergekit_options(p: argparse.ArgumentParser) -> None:
    """Add mergekit-yaml's options to the ``merge`` parser (``--device`` is already there)."""
    g = p.add_argument_group(
        "mergekit-yaml options",
        "accepted with mergekit's meaning; see README, 'mergekit's command line'",
    )
    help_ = {
        "cuda": "merge on the GPU (= --device cuda)",
        "copy-tokenizer": "copy the tokenizer files to the output (default: yes)",
        "write-model-card": "write README.md (default: yes)",
        "quiet": "no progress display and no summary line",
        "safe-serialization": "safetensors output (always; --no-... prints a note)",
        "unsafe-truncate-embeddings": "not supported (refused)",
    }
    for name in BOOL_FLAGS:
        g.add_argument(
            f"--{name}",
            action=argparse.BooleanOptionalAction,
            default=None,
            help=help_.get(name) or f"no effect: {NOTES[name.replace('-', '_')][1]}",
        )
    g.add_argument(
        "--gpu-rich",
        action="store_true",
        default=None,
        help="= --cuda and mergekit's --low-cpu-memory --read-to-gpu --multi-gpu",
    )
    g.add_argument(
        "--out-shard-size",
        metavar="SIZE",
        help="output shard size in bytes, mergekit's syntax: 5B = 5 billion (default)",
    )
    g.add_argument(
        "--transformers-cache",
        metavar="DIR",
        help="Hugging Face hub cache for model ids (sets HF_HUB_CACHE)",
    )
    g.add_argument(
        "--random-seed",
        type=int,
        metavar="N",
        help="seed of the randomized methods (overrides the config's seed:)",
    )
    g.add_argument("--num-threads", "-j", type=int, metavar="N", help="CPU threads of torch")
    g.add_argument(
        "-v", dest="verbosity", action="count", default=0, help="more log output (-vv: debug)"
    )
    for name, kind in (
        ("lora-merge-cache", str),
        ("lora-merge-dtype", str),
        ("write-threads", int),
    ):
        note = NOTES[name.replace("-", "_")][1]
        g.add_argument(f"--{name}", type=kind, metavar="X", help=f"no effect: {note}")


def add_mergekit_multi_options(p: argparse.ArgumentParser) -> None:
    """mergekit-multi's own options (mergekit 0.1.5) on the ``multi`` parser: ``--out-path``,
    ``-I/--intermediate-dir`` (optional here: without it intermediates stay in memory or a
    temporary folder) and ``--lazy/--no-lazy``; mergeforge's ``--intermediates``."""
    g = p.add_argument_group("mergekit-multi options", "accepted with mergekit-multi's meaning")
    g.add_argument(
        "--out-path", metavar="OUT",
        help="the final merge's output folder (the unnamed one, else the one no stage uses)",
    )  # fmt: skip
    g.add_argument(
        "--intermediate-dir", "-I", metavar="DIR",
        help="write every named stage to DIR/NAME and keep it (mergekit-multi); without it "
        "intermediates are kept in memory or a temporary folder and removed",
    )  # fmt: skip
    g.add_argument(
        "--lazy", action=argparse.BooleanOptionalAction, default=True,
        help="with -I: reuse a stage already in DIR/NAME (default: yes)",
    )  # fmt: skip
    g.add_argument(
        "--intermediates", choices=("auto", "memory", "disk"), default="auto",
        help="without -I: keep intermediates in memory (auto: when one takes at most half of "
        "the available memory) or in a temporary folder beside the output",
    )  # fmt: skip


def parse_kmb(value: str, where: str = "--out-shard-size") -> int:
    """A size as mergekit's ``parse_kmb`` reads it: a number with an optional ``K``, ``M`` or
    ``B`` suffix (thousand, million, *billion*), in bytes: ``5B`` is 5,000,000,000 bytes, not
    5 bytes. Decimals (``1.5B``) are also accepted, and mergeforge's unit forms with a prefix
    (``5GB``, ``500MiB``)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMbB]?)\s*", value)
    if m:
        mult = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}[m[2].lower()]
        size = int(float(m[1]) * mult)
        if size > 0:
            return size
    elif re.fullmatch(r"\s*\d+(?:\.\d+)?\s*[KMGTkmgt]i?B\s*", value):
        from mergeforge.config import parse_size

        return parse_size(value, where)
    raise ConfigError(
        f"{where}: {value!r} is not a size; use mergekit's syntax, bytes with an optional K, M "
        "or B (thousand, million, billion) suffix, e.g. 5B, or a unit like 5GB or 500MiB"
    )


def merge_options(args: argparse.Namespace, note: Callable[[str], None]) -> dict[str, Any]:
    """The ``run_merge`` keyword options the merge command's flags ask for (mergekit's and
    mergeforge's own), with process-wide settings applied (threads, hub cache, log level);
    ``note`` gets one line per mergekit flag accepted without effect. Also returns ``seed``
    (``None`` = the config's) and ``quiet`` for the caller."""
    if args.unsafe_truncate_embeddings:
        raise ConfigError(
            "--unsafe-truncate-embeddings is not supported: mergeforge does not cut embedding "
            "rows to the smallest vocabulary. Merge models that share a vocabulary, or run "
            "this merge with mergekit."
        )
    for dest, (trigger, text) in NOTES.items():
        value = getattr(args, dest)
        if value is not None and (trigger is None or value == trigger):
            flag = dest.replace("_", "-")
            flag = f"--no-{flag}" if value is False else f"--{flag}"
            note(f"{flag} is accepted for mergekit compatibility; {text}")
    if args.shard_size and args.out_shard_size:
        raise ConfigError("give one of --shard-size and --out-shard-size, not both")
    shard_size = None
    if args.shard_size:
        from mergeforge.config import parse_size

        shard_size = parse_size(args.shard_size, "--shard-size")
    elif args.out_shard_size:
        shard_size = parse_kmb(args.out_shard_size)
    device = args.device or ("cuda" if args.cuda or args.gpu_rich else "cpu")
    if device == "auto":  # mergekit: the GPU when there is one
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.num_threads is not None:
        if args.num_threads < 1:
            raise ConfigError(f"--num-threads: expected a positive count, got {args.num_threads}")
        import torch

        torch.set_num_threads(args.num_threads)
    if args.transformers_cache:
        os.environ["HF_HUB_CACHE"] = args.transformers_cache  # read when ids are resolved
    if args.verbosity > 1:
        logging.getLogger().setLevel(logging.DEBUG)
    return {
        "device": device,
        "shard_size": shard_size,
        "copy_tokenizer": args.copy_tokenizer is not False,
        "write_model_card": args.write_model_card is not False,
        "seed": args.random_seed,
        "quiet": bool(args.quiet),
    }


def print_note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)
