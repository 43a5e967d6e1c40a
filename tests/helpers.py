"""Shared test helpers (no test imports another test file; they import from here).

* tiny models: :func:`tiny_model` / :func:`make_family` (Hugging Face folders built from a
  ``transformers`` config) and :func:`write_model` (a folder holding one safetensors file of
  hand-chosen tensors);
* folders: :func:`load_dir` (every tensor of a safetensors folder), :func:`sha_tree` (a hash per
  file, to show inputs are untouched);
* mergekit as the reference: tests that compare with it carry ``@pytest.mark.mergekit`` and are
  skipped, one by one and with the reason, when it is not importable (tests/conftest.py);
  :func:`run_mergekit` merges with it; :func:`mergekit_configs` are the YAMLs both tools run;
* a CLI merge stopped half-way without timers: :func:`start_blocked` (see its docstring).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# ---- tiny models ---------------------------------------------------------------------------


def tiny_model(arch: str, seed: int = 0):
    """A seeded 3-layer Llama, GPT-2 or BERT with 32-wide hidden states and 128 tokens."""
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = tf.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
            tie_word_embeddings=False,
        )  # fmt: skip
        return tf.LlamaForCausalLM(cfg)
    if arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=128, n_positions=64)
        return tf.GPT2LMHeadModel(cfg)
    if arch == "bert":
        cfg = tf.BertConfig(
            hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
            vocab_size=128, max_position_embeddings=64,
        )  # fmt: skip
        return tf.BertModel(cfg)
    raise ValueError(arch)


def make_family(root: Path, arch: str, n_experts: int = 3, scale: float = 0.02) -> dict:
    """Save a base model and ``n_experts`` fine-tune-like variants (base + seeded noise whose
    size differs per expert) as Hugging Face folders. Returns {"base": path, "experts": [...]}."""
    model = tiny_model(arch)
    base_dir = root / f"{arch}-base"
    model.save_pretrained(base_dir, safe_serialization=True)
    experts = []
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for e in range(n_experts):
        g = torch.Generator().manual_seed(100 + e)
        with torch.no_grad():
            for k, p in model.state_dict().items():
                if p.is_floating_point():
                    noise = torch.randn(p.shape, generator=g) * scale * (1 + e)
                    p.copy_(base_sd[k] + noise)
        d = root / f"{arch}-expert{e}"
        model.save_pretrained(d, safe_serialization=True)
        experts.append(d)
    return {"base": base_dir, "experts": experts}


def write_model(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """``folder/model.safetensors`` holding ``tensors``: a model the engine opens (no config)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    return folder


def layer_family(root: Path, n: int, dim: int, names=("base", "e1", "e2")) -> list[Path]:
    """Models ``root/models/<name>`` with ``n`` seeded (dim, dim) fp32 layers
    ``model.layers.{i}.mlp.weight`` each: 3·n·dim²·4 bytes in all (n=20, dim=64: 1 MB)."""
    g = torch.Generator().manual_seed(0)
    return [
        write_model(root / "models" / name,
                    {f"model.layers.{i}.mlp.weight": torch.randn(dim, dim, generator=g)
                     for i in range(n)})
        for name in names
    ]  # fmt: skip


# ---- folders -------------------------------------------------------------------------------


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the ``*.safetensors`` files in folder ``d``."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(glob.glob(str(Path(d) / "*.safetensors"))):
        out.update(load_file(f))
    return out


def sha_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (symlinks not followed), by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


# ---- mergekit, the reference ---------------------------------------------------------------


@functools.cache
def mergekit_missing() -> str | None:
    """``None`` when mergekit imports, else why a comparison with it is skipped."""
    try:
        import mergekit.merge  # noqa: F401
    except ImportError as e:
        return f"compares with mergekit, which is not importable here ({e})"
    _patch_mergekit_alias_bug()
    return None


def _patch_mergekit_alias_bug() -> None:
    """mergekit 0.1.5 crashes on optional weights that have aliases (BERT's
    ``embeddings.position_ids``): ``plan_tensor`` evaluates ``list + WeightInfo.aliases`` (a
    tuple). Give it a tuple that can be added to a list; nothing else changes."""
    from mergekit.plan import MergePlanner

    original = MergePlanner.plan_tensor
    if getattr(original, "_mf_patched", False):
        return

    class Aliases(tuple):  # hashable like a tuple, but `list + Aliases` works
        def __radd__(self, other):
            return list(other) + list(self)

    def plan_tensor(self, weight, weights_in, models, cfg_reader):
        fix = lambda w: w.model_copy(update={"aliases": Aliases(w.aliases)}) if w.aliases else w  # noqa: E731
        return original(self, fix(weight), [fix(w) for w in weights_in], models, cfg_reader)

    plan_tensor._mf_patched = True
    MergePlanner.plan_tensor = plan_tensor


def run_mergekit(cfg: dict, out: Path) -> dict[str, torch.Tensor]:
    """mergekit's merge of ``cfg`` into ``out`` (tests marked ``mergekit`` only)."""
    reason = mergekit_missing()
    assert reason is None, f"{reason}: mark the test @pytest.mark.mergekit"
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    logging.getLogger().setLevel(logging.WARNING)
    run_merge(
        MergeConfiguration.model_validate(cfg),
        str(out),
        MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0),
    )
    return load_dir(out)


def mergekit_configs(fam: dict) -> dict[str, dict]:
    """One YAML per method both tools have, on the family ``fam`` (see :func:`make_family`):
    per-model parameters, a gradient and a filter, as real mergekit YAMLs use them."""
    base = str(fam["base"])
    e = [str(p) for p in fam["experts"]]
    return {
        "linear": {
            "merge_method": "linear",
            "models": [
                {"model": e[0], "parameters": {"weight": 0.5}},
                {"model": e[1], "parameters": {"weight": [0.2, 0.8]}},
                {"model": e[2], "parameters": {"weight": 0.3}},
            ],
            "dtype": "float32",
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [
                {"model": e[0], "parameters": {"weight": 0.7}},
                {
                    "model": e[1],
                    "parameters": {"weight": [{"filter": "mlp", "value": -0.4}, {"value": 0.5}]},
                },
                {"model": e[2], "parameters": {"weight": [0.1, 0.9, 0.3]}},
            ],
            "parameters": {"lambda": 0.8},
            "dtype": "float32",
        },  # fmt: skip
        "ties": {
            "merge_method": "ties",
            "base_model": base,
            "models": [
                {"model": e[0], "parameters": {"weight": 1.0, "density": 0.5}},
                {"model": e[1], "parameters": {"weight": 0.6, "density": [0.2, 0.9]}},
                {"model": e[2], "parameters": {"weight": 0.8, "density": 0.7}},
            ],
            "parameters": {"normalize": True, "lambda": 1.1},
            "dtype": "float32",
        },
        "breadcrumbs": {
            "merge_method": "breadcrumbs",
            "base_model": base,
            "models": [
                {"model": m, "parameters": {"weight": 0.5, "density": 0.8, "gamma": 0.05}}
                for m in e
            ],
            "dtype": "float32",
        },  # fmt: skip
        "breadcrumbs_ties": {
            "merge_method": "breadcrumbs_ties",
            "base_model": base,
            "models": [
                {"model": m, "parameters": {"weight": 0.5, "density": 0.7, "gamma": 0.1}} for m in e
            ],
            "parameters": {"normalize": True},
            "dtype": "float32",
        },  # fmt: skip
        "model_stock": {
            "merge_method": "model_stock",
            "base_model": base,
            "models": [{"model": m} for m in e],
            "dtype": "float32",
        },
        "slerp": {
            "merge_method": "slerp",
            "base_model": base,
            "models": [{"model": base}, {"model": e[1]}],
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
                    {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]},
                    {"value": 0.4},
                ]
            },
            "dtype": "float32",
        },  # fmt: skip
    }


# ---- a merge stopped half-way, deterministically ---------------------------------------------


def full_pipe() -> tuple[int, int, int]:
    """A pipe whose buffer is already full: ``(read fd, write fd, bytes in it)``."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    filled = 0
    try:
        while True:
            filled += os.write(w, b"\0" * 4096)
    except BlockingIOError:
        pass
    os.set_blocking(w, True)  # the child's writes must block, not fail
    return r, w, filled


def start_blocked(argv: list[str], *, preexec=None, timeout: float = 120):
    """Start ``argv`` with its stderr a pipe that is already full; return once its main thread
    sleeps in a write to that pipe: ``(process, read fd, filler length)``.

    "Half-way" without timers: the child runs until it first writes to stderr, and stays there
    (a CLI merge with progress lines on writes its first after >= 10% of the tensors; a script
    writes where the test wants). The kernel reports the sleep in ``/proc/PID/wchan``; the child
    cannot move on until the test reads the pipe (:func:`finish`). Linux only."""
    r, w, filled = full_pipe()

    def child_setup() -> None:
        # a run started under nohup or as a background job (SIGHUP / SIGINT ignored) must not
        # make the child ignore the signals the test sends; the test's own preexec comes after
        for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
            signal.signal(s, signal.SIG_DFL)
        if preexec is not None:
            preexec()

    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=w, preexec_fn=child_setup)
    os.close(w)
    deadline = time.monotonic() + timeout
    wchan = ""
    while time.monotonic() < deadline and proc.poll() is None:
        wchan = Path(f"/proc/{proc.pid}/wchan").read_text()
        if "pipe_write" in wchan:
            return proc, r, filled
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    os.close(r)
    raise AssertionError(f"the child never blocked on its stderr (rc={proc.poll()}, {wchan=})")


def merge_argv(cfg: Path, out: Path, *flags: str) -> list[str]:
    """``mergeforge merge CFG OUT FLAGS`` in a child Python (progress lines on: not a tty)."""
    return [sys.executable, "-m", "mergeforge.cli", "merge", str(cfg), str(out), *flags]


def finish(proc, r: int, filled: int) -> str:
    """Drain the child's stderr to the end, wait for it; its stderr minus the filler."""
    with os.fdopen(r, "rb") as f:
        data = f.read()
    proc.wait(timeout=60)
    return data[filled:].decode(errors="replace")


def written_fraction(partial: Path, total: int) -> float:
    """Share of the declared shard bytes already allocated on disk (the shards are sparse
    until tensors arrive)."""
    return sum(p.stat().st_blocks * 512 for p in partial.iterdir()) / total


# ---- models whose vocabularies differ (tests/test_vocab*.py) ----------------------------------


def tiny_tokenizer(words, *, added=(), special_added=()):
    """A real fast tokenizer (BPE over whole words, no merges; ``[UNK]``, ``<s>``, ``</s>``)
    with ``words`` in that id order, then the plain ``added`` and special ``special_added``
    tokens."""
    import transformers as tf
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.BPE(vocab, [], unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )
    if added:
        fast.add_tokens(list(added))
    if special_added:
        fast.add_tokens([AddedToken(t, special=True, normalized=False) for t in special_added])
    return fast


def vocab_model(folder: Path, tokenizer, seed: int, *, vocab_size: int | None = None,
                tied: bool = False, save_tokenizer: bool = True) -> Path:  # fmt: skip
    """A seeded 2-layer Llama (hidden 32) with ``vocab_size`` rows (default: the tokenizer's
    length) saved with its tokenizer at ``folder``."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab_size or len(tokenizer),
        max_position_embeddings=64, tie_word_embeddings=tied,
    )  # fmt: skip
    model = tf.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed + p.numel()))
    model.save_pretrained(folder, safe_serialization=True)
    if save_tokenizer:
        tokenizer.save_pretrained(folder)
    return folder


def vocab_family(root: Path) -> dict[str, str]:
    """Models whose vocabularies differ, each with real tokenizer files:

    * ``base``: words w0..w29 (33 tokens, 33 rows);
    * ``shuffled``: words w10..w39 in reverse order (same size, other ids, 10 new words);
    * ``added``: the base's words plus an added ``<x>`` and a special ``<|im_start|>``, 40 rows
      (padding past its 35 tokens);
    * ``tied``: words w5..w34 plus ``<x>``, tied embeddings (no ``lm_head.weight``);
    * ``same``: the base's tokenizer, other weights;
    * ``no_tokenizer``: like ``same`` but without tokenizer files;
    * ``long``: the base's words plus two added tokens past its vocab_size (33 rows).
    """
    words = [f"w{i}" for i in range(40)]
    specs = {
        "base": (tiny_tokenizer(words[:30]), {}),
        "shuffled": (tiny_tokenizer(words[10:40][::-1]), {}),
        "added": (tiny_tokenizer(words[:30], added=["<x>"], special_added=["<|im_start|>"]),
                  {"vocab_size": 40}),
        "tied": (tiny_tokenizer(words[5:35], added=["<x>"]), {"tied": True}),
        "same": (tiny_tokenizer(words[:30]), {}),
        "no_tokenizer": (tiny_tokenizer(words[:30]), {"save_tokenizer": False}),
        "long": (tiny_tokenizer(words[:30], added=["<y>", "<z>"]), {"vocab_size": 33}),
    }  # fmt: skip
    return {
        name: str(vocab_model(root / name, tok, seed, **kw))
        for seed, (name, (tok, kw)) in enumerate(specs.items())
    }
