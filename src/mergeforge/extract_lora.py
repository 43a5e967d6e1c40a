"""``mergeforge extract-lora FINETUNED --base BASE --rank R OUT``: a PEFT LoRA adapter from the
difference between a fine-tuned model and its base (mergekit-extract-lora's job, re-done on
mergeforge's I/O).

For every linear weight ``W`` (``out x in``) the task vector ``ΔW = W_ft - W_base`` is taken in
float32 and cut to rank ``r`` by a truncated SVD, ``ΔW ≈ B A`` with ``B = U_r √S_r`` (``out x
r``) and ``A = √S_r V_rᵀ`` (``r x in``): PEFT's ``lora_B`` and ``lora_A`` with
``lora_alpha = r`` (scaling 1), so ``W_base + B A`` is the best rank-``r`` approximation of
``W_ft`` in the Frobenius norm (Eckart-Young). The relative error ``‖ΔW - BA‖_F / ‖ΔW‖_F`` of
each tensor is measured with the factors as written and reported (stderr table, and
``mergeforge_extract_lora.json`` beside the adapter).

Everything is decided from the two checkpoints' headers before any tensor is read: which
module is extracted, saved whole or skipped, every shape of the fine-tuned model against the
base's (a mismatch names the tensor and both files), the rank against each matrix. Then the
modules stream through a small thread pool, one tensor pair each (read lazily, memory-mapped);
the factors go to a spill file in the output's hidden staging folder as they are computed, and
the adapter file is assembled from it at the end, with the modules saved whole streamed from
the fine-tuned checkpoint one at a time: memory stays bounded by the tensors in flight.

The output folder appears whole or not at all (the staging folder of ``checkpoint/_staging.py``,
the output checks of ``mergeforge merge``: never an input, never inside or around one, only an
earlier extract-lora output replaced with ``overwrite``). It holds ``adapter_config.json``,
``adapter_model.safetensors`` (PEFT's key names), ``mergeforge_extract_lora.json`` (options and
per-tensor errors) and ``README.md``; it loads with ``PeftModel.from_pretrained(base, OUT)``.

What is extracted, as mergekit 0.1.5 decides it, from the tensor names (no model code is run):

- a module with a 2-D ``weight`` is a linear layer: LoRA. GPT-2-style ``Conv1D`` models (their
  weights stored ``in x out``) are LoRA'd too, with ``fan_in_fan_out`` (mergekit saves them
  whole);
- token/position embeddings and the output head (``lm_head``, ``embed_out``) are saved whole
  (PEFT ``modules_to_save``), unless ``embed_lora``: then embeddings get ``lora_embedding_A/B``
  (the decomposition of ``ΔWᵀ``) and the head a plain LoRA; a head tied to the token embedding
  gets none (it is the embedding's matrix, which ``merge_and_unload`` changes once; mergekit
  LoRAs both, which merges ``2ΔE``). A vocabulary that differs from the base's forces them to
  be saved whole, as in mergekit;
- any other module with a weight (norms, 3-D or 4-D weights) is saved whole, or skipped with
  ``skip_undecomposable``;
- ``save_modules`` (full module names or their last component) are saved whole always;
  ``include``/``exclude`` regexes (``re.search`` on the module name) select the rest.

Where mergeforge differs, on purpose: modules whose task vector is exactly zero are left out
(mergekit writes all-zero factors; embeddings and norms it saves whole even when unchanged:
here only changed ones are saved, the ones named by ``save_modules`` always); a module cut to
rank 0 by ``sv_epsilon`` is left out (PEFT refuses ``r = 0``); ``modules_to_save`` and, when
they are not all modules of a kind, ``target_modules`` list full module names (PEFT matches by
suffix: mergekit's ``norm`` also catches every ``*_layernorm``); bias changes become PEFT's
``lora_bias`` when every LoRA module has a bias (mergekit writes ``lora_B.bias`` without it,
which PEFT drops), a module whose bias alone changed (a BitFit-style fine-tune) then getting a
zero rank-1 LoRA that carries it, else saved whole: a bias change is never dropped; the task
vector is taken in float32 (mergekit subtracts in the models' dtype); ``include`` applies to
embeddings too (mergekit saves them whatever ``include`` says).
A rank larger than a matrix is an error naming the tensor; ``clamp_rank`` (the CLI's
``--max-rank``) clamps it per matrix as mergekit does. An adapter that would be all zeros (the
fine-tuned model equals its base) is an error: nothing is written.

SVD (``svd``): ``"gram"`` (default) and ``"exact"`` give the same top-``r`` factors to
rounding (both agree with mergekit to its tolerance; on the 271M benchmark gram ran at 3.6x
mergekit's speed, exact at 1.4x). ``"exact"`` is ``torch.linalg.svd`` in float32, mergekit's
maths (computed on the tall orientation of the matrix, which LAPACK does ~2x faster: the same
result to rounding); ``"gram"`` is exact too (to float64 rounding): the top-``r`` eigenvectors
of the smaller float64 Gram matrix ``ΔW ΔWᵀ`` or ``ΔWᵀ ΔW`` (scipy's partial eigensolver when
scipy is installed), 2-5x faster on CPU; ``"randomized"`` is the randomized range finder of
Halko, Martinsson & Tropp (2011) (``torch.svd_lowrank``'s algorithm, with a generator seeded per
tensor so that results do not depend on thread timing): ``rank + oversample`` columns,
``power_iters`` power iterations; fastest, approximate (its error is in the report).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import resource
import struct
import sys
import threading
import time
import zlib
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mergeforge.checkpoint import Checkpoint, TensorInfo, open_checkpoint
from mergeforge.checkpoint._dtypes import TORCH_TO_SAFETENSORS
from mergeforge.checkpoint._staging import Staging, fsync_path, probe_writable
from mergeforge.device import resolve_device
from mergeforge.engine import (  # the output checks of `merge` (engine/output.py)
    check_not_among,
    check_output_location,
    check_replaceable,
    checkpoint_paths,
    is_previous_output,
)
from mergeforge.errors import CheckpointError, ConfigError, ValidationError

log = logging.getLogger("mergeforge")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
REPORT = "mergeforge_extract_lora.json"
MARKERS = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, REPORT)
"""Files every extract-lora output has (what ``overwrite`` recognises as an earlier one)."""
WRITTEN = ("README.md",)
"""Files extract-lora writes besides :data:`MARKERS`."""
SVD_METHODS = ("exact", "gram", "randomized")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PREFIX = "base_model.model."

_INPUT_EMBEDDINGS = frozenset({
    "embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings",
    "token_type_embeddings", "embed_positions", "shared", "embed_in", "tok_embeddings",
    "embeddings", "embedding",
})  # fmt: skip
_OUTPUT_EMBEDDINGS = frozenset({"lm_head", "embed_out"})
_TOKEN_EMBEDDINGS = frozenset({"embed_tokens", "wte", "word_embeddings", "embed_in",
                               "tok_embeddings"})  # fmt: skip
_CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
"""Model types whose linear layers are transformers' ``Conv1D`` (weights stored in x out)."""
_TASK_TYPES = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
)


# ---- the plan: decided from the headers ---------------------------------------------------


@dataclass(frozen=True)
class ModulePlan:
    """What happens to one module of the fine-tuned model."""

    module: str
    action: str
    """``"lora"``, ``"lora_embedding"`` (PEFT's embedding LoRA, of ``ΔWᵀ``) or ``"save"``."""
    weight: str | None
    bias: str | None
    shape: tuple[int, ...]
    """The fine-tuned weight's shape as stored."""
    rank: int = 0
    transpose: bool = False
    """Decompose ``ΔWᵀ``: embeddings (vocab x dim) and ``Conv1D`` weights (in x out)."""
    explicit: bool = False
    """Named by ``save_modules``: saved whole even when unchanged."""
    nbytes: int = 0


@dataclass(frozen=True)
class TensorError:
    """One row of the report."""

    module: str
    kind: str
    """``lora``, ``lora_embedding``, ``saved`` (whole), or ``unchanged`` (left out)."""
    shape: tuple[int, ...]
    rank: int | None
    """The rank written (``None``: saved whole or left out)."""
    rel_error: float
    """``‖ΔW - BA‖_F / ‖ΔW‖_F`` with the factors as written (0 for a module saved whole)."""
    bias: bool = False
    """A changed bias went with it (as ``lora_B.bias``, or in the module saved whole)."""


@dataclass(frozen=True)
class ExtractResult:
    out: Path
    rank: int
    """PEFT's ``r``: the largest rank written (others are in ``rank_pattern``)."""
    svd: str
    modules: int
    """Modules with LoRA factors."""
    saved: tuple[str, ...]
    """Modules saved whole (PEFT ``modules_to_save``)."""
    tensors: tuple[TensorError, ...]
    bytes_written: int
    seconds: float
    peak_rss_bytes: int
    notes: tuple[str, ...] = ()

    @property
    def max_error(self) -> float:
        errs = [t.rel_error for t in self.tensors if t.kind.startswith("lora")]
        return max(errs, default=0.0)

    @property
    def mean_error(self) -> float:
        errs = [t.rel_error for t in self.tensors if t.kind.startswith("lora")]
        return sum(errs) / len(errs) if errs else 0.0


@dataclass(frozen=True)
class _Options:
    rank: int
    clamp_rank: bool
    svd: str
    distribute_scale: bool
    sv_epsilon: float
    oversample: int
    power_iters: int
    seed: int
    out_dtype: torch.dtype | None


def _last(module: str) -> str:
    return module.rpartition(".")[2]


def is_input_embedding(module: str) -> bool:
    """A token / position embedding (``nn.Embedding``), from its name."""
    last = _last(module)
    return last in _INPUT_EMBEDDINGS or last.endswith(("_embeddings", "_embedding"))


def is_output_embedding(module: str) -> bool:
    return _last(module) in _OUTPUT_EMBEDDINGS


def _matches(module: str, names: Iterable[str]) -> bool:
    """mergekit's ``--save-module`` rule: the full module name or its last component."""
    return any(module == n or _last(module) == n for n in names)


def _compile(patterns: Sequence[str], flag: str) -> list[re.Pattern[str]]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ConfigError(f"{flag} {p!r} is not a valid regular expression ({e})") from None
    return out


def _shown(items: Sequence[str], n: int = 5) -> str:
    return "; ".join(items[:n]) + (f"; and {len(items) - n} more" if len(items) > n else "")


def plan_extraction(
    ft: Checkpoint,
    base: Checkpoint,
    *,
    rank: int,
    clamp_rank: bool = False,
    embed_lora: bool = False,
    save_modules: Sequence[str] = (),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    skip_undecomposable: bool = False,
) -> tuple[list[ModulePlan], list[str]]:
    """Every module's fate, from the headers only: ``(jobs, notes)``. Raises
    :class:`ValidationError` for tensors whose shapes differ (naming them and both files), a
    tensor of a LoRA module missing from the base, and a rank larger than a matrix (unless
    ``clamp_rank``); :class:`ConfigError` for bad options."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    inc, exc = _compile(include, "--include-regex"), _compile(exclude, "--exclude-regex")
    notes: list[str] = []
    ft_type = (ft.config or {}).get("model_type")
    base_type = (base.config or {}).get("model_type")
    if ft_type and base_type and ft_type != base_type:
        raise ValidationError(
            f"{ft.path} is a {ft_type!r} model but {base.path} is a {base_type!r} model "
            "(config.json model_type); extract a LoRA from a model fine-tuned from this base."
        )
    conv1d = ft_type in _CONV1D_MODEL_TYPES

    modules: dict[str, dict[str, TensorInfo]] = {}
    others: list[str] = []
    for key in ft.keys():
        info = ft.info(key)
        module, _, param = key.rpartition(".")
        if param in ("weight", "bias") and module and info.dtype.is_floating_point:
            modules.setdefault(module, {})[param] = info
        else:
            others.append(key)
    if not modules:
        raise ValidationError(f"{ft.path}: no module weights (`*.weight`) found; nothing to "
                              "extract. Pass a model checkpoint.")  # fmt: skip
    if others:
        notes.append(f"{len(others)} tensor(s) that are not a module's floating-point weight or "
                     f"bias are not in the adapter: {_shown(others, 3)}")  # fmt: skip

    base_keys = set(base.keys())
    # every shape first (a resized vocabulary aside: embeddings are then saved whole)
    mismatched = [
        f"{p.name}: {list(p.shape)} in {p.file}, {list(bs)} in {base.info(p.name).file}"
        for module, params in modules.items()
        if not (is_input_embedding(module) or is_output_embedding(module))
        for p in params.values()
        if p.name in base_keys and (bs := base.info(p.name).shape) != p.shape
    ]
    if mismatched:
        raise ValidationError(
            f"{ft.path} and {base.path} have tensors of different shapes ({len(mismatched)}): "
            f"{_shown(mismatched)}. A LoRA is extracted from a model fine-tuned from this very "
            "base; check that BASE is the model FINETUNED was trained from. Nothing was written."
        )
    ft_vocab = base_vocab = None
    for module, params in modules.items():
        w = params.get("weight")
        if w is not None and is_input_embedding(module) and w.name in base_keys:
            ft_vocab, base_vocab = w.shape[0], base.info(w.name).shape[0]
            break
    if embed_lora and ft_vocab != base_vocab:
        notes.append(
            f"the vocabulary differs ({ft_vocab} tokens fine-tuned, {base_vocab} in the base): "
            "embeddings are saved whole, not as LoRA (as mergekit does); resize the base's "
            f"token embeddings to {ft_vocab} before loading the adapter"
        )
        embed_lora = False

    jobs: list[ModulePlan] = []
    missing: list[str] = []
    vocab_saved: list[str] = []
    for module, params in modules.items():
        w, b = params.get("weight"), params.get("bias")
        embedding = is_input_embedding(module) or is_output_embedding(module)
        selected = not any(r.search(module) for r in exc) and (
            not inc or any(r.search(module) for r in inc)
        )
        nbytes = sum(p.nbytes for p in params.values())
        save = dict(module=module, action="save", weight=w and w.name, bias=b and b.name,
                    shape=w.shape if w else b.shape, nbytes=nbytes)  # fmt: skip
        if _matches(module, save_modules):
            jobs.append(ModulePlan(**save, explicit=True))
            continue
        if not selected:
            continue
        decomposable = w is not None and len(w.shape) == 2
        if embedding and (not embed_lora or not decomposable):
            jobs.append(ModulePlan(**save))
            continue
        if not decomposable:
            if not skip_undecomposable:
                jobs.append(ModulePlan(**save))
            continue
        shape_ok = True
        for p in params.values():
            if p.name not in base_keys:
                missing.append(p.name)
                shape_ok = False
            elif base.info(p.name).shape != p.shape:  # an embedding of a resized vocabulary
                vocab_saved.append(module)  # (others were refused above): saved whole
                shape_ok = False
        if not shape_ok:
            if module in vocab_saved:
                jobs.append(ModulePlan(**save))
            continue
        transpose = is_input_embedding(module) or (conv1d and not embedding)
        action = "lora_embedding" if is_input_embedding(module) else "lora"
        jobs.append(ModulePlan(module=module, action=action, weight=w.name,
                               bias=b.name if b is not None else None, shape=w.shape,
                               rank=rank, transpose=transpose, nbytes=nbytes))  # fmt: skip
    if missing:
        raise ValidationError(
            f"{len(missing)} tensor(s) of {ft.path} are not in the base {base.path}: "
            f"{_shown(missing)}. Pass the base FINETUNED was trained from, or leave those "
            "modules out with --exclude-regex (or save them whole with --save-module). Nothing "
            "was written."
        )
    if vocab_saved:
        notes.append(f"{', '.join(vocab_saved)}: vocabulary size differs from the base's; saved "
                     "whole (resize the base's embeddings before loading the adapter)")  # fmt: skip
    head, tied_note = _tied_head(ft, jobs)
    if tied_note is not None:
        notes.append(tied_note)
    if (
        head is not None
        and not any(r.search(head.module) for r in exc)
        and (not inc or any(r.search(head.module) for r in inc))
    ):
        jobs.append(head)
    extra = sorted(base_keys - set(ft.keys()))
    if extra:
        notes.append(f"{len(extra)} tensor(s) of the base are not in the fine-tuned model and are "
                     f"ignored: {_shown(extra, 3)}")  # fmt: skip

    too_big = []
    out: list[ModulePlan] = []
    for j in jobs:
        if j.action == "save":
            out.append(j)
            continue
        k = min(j.shape)
        if rank > k:
            if not clamp_rank:
                too_big.append(f"{j.weight} {list(j.shape)} (at most rank {k}) in "
                               f"{ft.info(j.weight).file}")  # fmt: skip
                continue
            j = replace(j, rank=k)
        out.append(j)
    if too_big:
        raise ValidationError(
            f"rank {rank} is larger than {len(too_big)} matrix(es) allow: {_shown(too_big)}. "
            "Use a smaller --rank, --max-rank to clamp the rank per matrix as mergekit does, or "
            "leave those modules out with --exclude-regex. Nothing was written."
        )
    if not out:
        raise ConfigError("no module is selected for extraction (check --include-regex / "
                          "--exclude-regex); nothing was written")  # fmt: skip
    return out, notes


def _tied_head(ft: Checkpoint, jobs: list[ModulePlan]) -> tuple[ModulePlan | None, str | None]:
    """A causal LM whose output head is tied to its token embeddings (``tie_word_embeddings``,
    no ``lm_head.weight`` in the checkpoint): ``(the head's job, a note)``. An embedding saved
    whole: the head ``lm_head`` is saved whole too, from the embedding's tensor (as mergekit
    does through its tied names; PEFT would otherwise keep the base's head under a changed
    embedding). An embedding LoRA (``embed_lora``): no LoRA of the head, only a note. The head
    *is* the embedding's matrix, so ``merge_and_unload`` puts the embedding's ``ΔE`` into both;
    a second LoRA of ``ΔE`` on the head would be merged into that one matrix too (``2ΔE``:
    mergekit's adapter does that), and PEFT 0.21's ``ensure_weight_tying`` merges the tied
    adapter twice as well. ``(None, None)`` for any other model."""
    cfg = ft.config or {}
    if _task_type(cfg) != "CAUSAL_LM" or not cfg.get("tie_word_embeddings", True):
        return None, None
    if any(k.startswith("lm_head.") for k in ft.keys()):
        return None, None
    vocab = cfg.get("vocab_size")
    for j in jobs:
        if j.action == "save" and j.explicit:
            continue
        token = is_input_embedding(j.module) and len(j.shape) == 2 and j.weight is not None
        if token and (j.shape[0] == vocab or _last(j.module) in _TOKEN_EMBEDDINGS):
            if j.action == "save":
                head = ModulePlan("lm_head", "save", j.weight, None, j.shape, nbytes=j.nbytes)
                return head, None
            return None, (
                f"lm_head is tied to {j.module}: its embedding LoRA changes the shared matrix, "
                "so merge_and_unload gives the fine-tuned head too; PEFT applies it unmerged "
                "to the input embeddings only (merge the adapter to use the head's change)"
            )
    return None, None


# ---- the maths: one matrix --------------------------------------------------------------


def _eigh_top(g: Tensor, k: int) -> Tensor:
    """The eigenvectors of the ``k`` largest eigenvalues of the symmetric ``g`` (float64),
    largest first: scipy's partial solver (``syevr``) on the CPU when scipy is installed,
    else (and on a GPU) ``torch.linalg.eigh``."""
    d = g.shape[0]
    if g.device.type == "cpu":
        try:
            import scipy.linalg as sl
        except ImportError:
            sl = None
        if sl is not None:
            _, vecs = sl.eigh(g.numpy(), subset_by_index=[d - k, d - 1], driver="evr",
                              overwrite_a=True, check_finite=False)  # fmt: skip
            return torch.from_numpy(vecs[:, ::-1].copy())
    _, vecs = torch.linalg.eigh(g)
    return vecs[:, d - k :].flip(1)


def _orth(y: Tensor) -> Tensor:
    return torch.linalg.qr(y).Q


def truncated_svd(
    delta: Tensor,
    rank: int,
    method: str = "exact",
    *,
    oversample: int = 10,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(U_r, S_r, V_rᵀ)`` of the float32 matrix ``delta`` (``m x n``), ``r = rank`` (at most
    ``min(m, n)``), singular values descending. ``method``: see the module docstring."""
    m, n = delta.shape
    r = min(rank, m, n)
    if method == "exact":
        if m < n:  # LAPACK is ~2x faster on the tall orientation: delta = (V S Uᵀ)ᵀ
            v, s, uh = torch.linalg.svd(delta.T, full_matrices=False)
            return uh[:r].T, s[:r], v[:, :r].T
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        return u[:, :r], s[:r], vh[:r]
    if method == "gram":
        x = delta.double()
        if m <= n:  # top-r left singular vectors from ΔWΔWᵀ; S Vᵀ = UᵀΔW
            u = _eigh_top(x @ x.T, r)
            c = u.T @ x
            s = torch.linalg.vector_norm(c, dim=1)
            order = torch.argsort(s, descending=True)
            u, c, s = u[:, order], c[order], s[order]
            vh = c / torch.where(s > 0, s, 1)[:, None]
        else:  # top-r right singular vectors from ΔWᵀΔW; U S = ΔW V
            v = _eigh_top(x.T @ x, r)
            c = x @ v
            s = torch.linalg.vector_norm(c, dim=0)
            order = torch.argsort(s, descending=True)
            v, c, s = v[:, order], c[:, order], s[order]
            u = c / torch.where(s > 0, s, 1)[None, :]
            vh = v.T
        return u.float(), s.float(), vh.float()
    if method == "randomized":
        q = min(r + max(oversample, 0), m, n)
        omega = torch.randn(n, q, generator=generator, device=delta.device, dtype=delta.dtype)
        basis = _orth(delta @ omega)
        for _ in range(max(power_iters, 0)):
            basis = _orth(delta @ _orth(delta.T @ basis))
        ub, s, vh = torch.linalg.svd(basis.T @ delta, full_matrices=False)
        return (basis @ ub)[:, :r], s[:r], vh[:r]
    raise ConfigError(f"svd {method!r} is not one of {', '.join(SVD_METHODS)}")


def lora_factors(
    delta: Tensor,
    rank: int,
    *,
    method: str = "exact",
    distribute_scale: bool = True,
    sv_epsilon: float = 0.0,
    oversample: int = 10,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """``(A, B)`` with ``B @ A`` the rank-``rank`` truncation of ``delta`` (``A``: ``k x n``,
    ``B``: ``m x k``); ``k`` is ``rank`` less the singular values not above ``sv_epsilon``
    (when positive), as in mergekit. ``distribute_scale``: ``√S`` on each side (mergekit's
    default), else ``B = U``, ``A = S Vᵀ``."""
    u, s, vh = truncated_svd(delta, rank, method, oversample=oversample,
                             power_iters=power_iters, generator=generator)  # fmt: skip
    k = s.shape[0]
    if sv_epsilon > 0:
        k = min(k, int((s > sv_epsilon).sum()))
    u, s, vh = u[:, :k], s[:k], vh[:k]
    if distribute_scale:
        root = s.sqrt()
        return root[:, None] * vh, u * root[None, :]
    return s[:, None] * vh, u.clone()


# ---- the adapter file: factors spilled, then assembled -------------------------------------


class _Spill:
    """An append-only scratch file of raw tensor bytes (any thread); ``put`` returns where."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self._end = 0
        self._lock = threading.Lock()

    def put(self, t: Tensor) -> tuple[int, int]:
        data = memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        with self._lock:
            offset, self._end = self._end, self._end + len(data)
        _pwrite_all(self._fd, data, offset)
        return offset, len(data)

    def copy_to(self, fd: int, offset: int, nbytes: int, dest: int) -> None:
        done = 0
        while done < nbytes:
            n = min(nbytes - done, 64 << 20)
            buf = os.pread(self._fd, n, offset + done)
            if not buf:
                raise OSError(f"{self.path}: short read")
            _pwrite_all(fd, memoryview(buf), dest + done)
            done += len(buf)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.path.unlink(missing_ok=True)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    pos = 0
    while pos < len(data):
        pos += os.pwrite(fd, data[pos : pos + (1 << 30)], offset + pos)


@dataclass
class _Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    spill: tuple[int, int] | None = None
    """(offset, nbytes) in the spill file, or None: read ``source`` from the checkpoint."""
    source: str | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def _write_safetensors(
    path: Path, entries: list[_Entry], spill: _Spill, ft: Checkpoint, metadata: dict[str, str]
) -> int:
    """Assemble the adapter file: header, then every tensor (largest element size first, then
    by name, as safetensors itself orders them), spilled factors copied, saved modules read
    from ``ft`` one at a time. Returns the file's size."""
    entries = sorted(entries, key=lambda e: (-e.dtype.itemsize, e.name))
    header: dict[str, Any] = {"__metadata__": metadata}
    pos = 0
    for e in entries:
        header[e.name] = {"dtype": TORCH_TO_SAFETENSORS[e.dtype], "shape": list(e.shape),
                          "data_offsets": [pos, pos + e.nbytes]}  # fmt: skip
        pos += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _pwrite_all(fd, memoryview(struct.pack("<Q", len(raw)) + raw), 0)
        for e in entries:
            begin = start + header[e.name]["data_offsets"][0]
            if e.spill is not None:
                spill.copy_to(fd, e.spill[0], e.spill[1], begin)
            else:
                t = ft.get(e.source).to(e.dtype).contiguous()
                _pwrite_all(fd, memoryview(t.reshape(-1).view(torch.uint8).numpy()), begin)
                del t
        os.ftruncate(fd, start + pos)
    finally:
        os.close(fd)
    return start + pos


# ---- running it ----------------------------------------------------------------------------


@dataclass
class _Done:
    """What one module's job produced."""

    report: TensorError | None
    entries: list[_Entry] = field(default_factory=list)
    bias_entry: _Entry | None = None
    bias_changed: bool = False
    rank: int = 0


def _seed(seed: int, module: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(module.encode())) % (2**63)


def _run_job(job: ModulePlan, ft: Checkpoint, base: Checkpoint, opts: _Options,
             dev: torch.device, spill: _Spill) -> _Done:  # fmt: skip
    if job.action == "save":
        return _save_job(job, ft, base, opts)
    out_dtype = opts.out_dtype or ft.info(job.weight).dtype
    w_ft = ft.get(job.weight).to(dev, torch.float32)
    w_base = base.get(job.weight).to(dev, torch.float32)
    delta = w_ft - w_base
    del w_ft, w_base
    if job.transpose:
        delta = delta.T
    norm = float(torch.linalg.vector_norm(delta))
    bias_entry, bias_changed = None, False
    if job.bias is not None:
        db = ft.get(job.bias).to(dev, torch.float32) - base.get(job.bias).to(dev, torch.float32)
        bias_changed = bool(db.any())
        name = f"{PREFIX}{job.module}.lora_B.bias"
        bias_entry = _Entry(name, out_dtype, tuple(db.shape), spill=spill.put(db.to(out_dtype)))
    shape = tuple(job.shape)
    if not math.isfinite(norm):
        raise ValidationError(f"{job.weight}: the difference between the models is not finite "
                              f"(NaN or Inf in {ft.info(job.weight).file} or "
                              f"{base.info(job.weight).file}); nothing was written")  # fmt: skip
    if norm == 0.0:
        return _Done(TensorError(job.module, "unchanged", shape, None, 0.0, bias_changed),
                     bias_entry=bias_entry, bias_changed=bias_changed)  # fmt: skip
    gen = None
    if opts.svd == "randomized":
        gen = torch.Generator(device=dev).manual_seed(_seed(opts.seed, job.module))
    a, b = lora_factors(delta, job.rank, method=opts.svd, distribute_scale=opts.distribute_scale,
                        sv_epsilon=opts.sv_epsilon, oversample=opts.oversample,
                        power_iters=opts.power_iters, generator=gen)  # fmt: skip
    k = a.shape[0]
    if k == 0:  # every singular value at or below sv_epsilon
        return _Done(TensorError(job.module, "unchanged", shape, 0, 1.0, bias_changed),
                     bias_entry=bias_entry, bias_changed=bias_changed)  # fmt: skip
    a, b = a.to(out_dtype), b.to(out_dtype)
    resid = torch.addmm(delta, b.float(), a.float(), alpha=-1)
    err = float(torch.linalg.vector_norm(resid)) / norm
    del resid, delta
    if job.action == "lora_embedding":
        names = (f"{PREFIX}{job.module}.lora_embedding_A", f"{PREFIX}{job.module}.lora_embedding_B")
    else:
        names = (f"{PREFIX}{job.module}.lora_A.weight", f"{PREFIX}{job.module}.lora_B.weight")
    entries = [_Entry(n, out_dtype, tuple(t.shape), spill=spill.put(t))
               for n, t in zip(names, (a, b), strict=True)]  # fmt: skip
    report = TensorError(job.module, job.action, shape, k, err, bias_changed)
    return _Done(report, entries, bias_entry, bias_changed, k)


def _zero_lora(job: ModulePlan, spill: _Spill, dtype: torch.dtype) -> list[_Entry]:
    """All-zero rank-1 LoRA factors of a linear module (``B A = 0``): a LoRA layer that
    changes no weight, for its ``lora_bias`` or for PEFT to have a layer to load."""
    rows, cols = (job.shape[1], job.shape[0]) if job.transpose else job.shape[:2]
    out = []
    for name, shape in ((f"{PREFIX}{job.module}.lora_A.weight", (1, cols)),
                        (f"{PREFIX}{job.module}.lora_B.weight", (rows, 1))):  # fmt: skip
        out.append(_Entry(name, dtype, shape, spill=spill.put(torch.zeros(shape, dtype=dtype))))
    return out


def _save_job(job: ModulePlan, ft: Checkpoint, base: Checkpoint, opts: _Options) -> _Done:
    names = [n for n in (job.weight, job.bias) if n is not None]
    base_keys = set(base.keys())
    changed = job.explicit
    if not changed:
        for n in names:
            if n not in base_keys or base.info(n).shape != ft.info(n).shape:
                changed = True
                break
            if not torch.equal(ft.get(n), base.get(n)):
                changed = True
                break
    shape = tuple(job.shape)
    if not changed:
        return _Done(TensorError(job.module, "unchanged", shape, None, 0.0))
    params = [(p, n) for p, n in (("weight", job.weight), ("bias", job.bias)) if n is not None]
    entries = [_Entry(f"{PREFIX}{job.module}.{p}", opts.out_dtype or ft.info(n).dtype,
                      ft.info(n).shape, source=n) for p, n in params]  # fmt: skip
    return _Done(TensorError(job.module, "saved", shape, None, 0.0, job.bias is not None), entries)


class _Progress:
    """A rich bar on stderr (a terminal), log lines every 10 % otherwise; or nothing."""

    def __init__(self, total: int, n: int, enabled: bool | None) -> None:
        self.total, self.n, self.done, self.done_bytes = max(total, 1), n, 0, 0
        self.t0 = time.perf_counter()
        self._next = 0.1
        self.enabled = enabled is not False
        self._bar = None
        if self.enabled and (enabled or sys.stderr.isatty()):
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("[bold]extracting"), BarColumn(), MofNCompleteColumn(),
                TimeRemainingColumn(), TextColumn("{task.description}"),
                console=Console(stderr=True),
            )  # fmt: skip
            self._bar.start()
            self._task = self._bar.add_task("", total=n)

    def advance(self, job: ModulePlan) -> None:
        self.done += 1
        self.done_bytes += job.nbytes
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, description=job.module)
        elif self.enabled and self.done_bytes / self.total >= self._next:
            el = time.perf_counter() - self.t0
            log.info("extracted %d/%d modules, %.0f%%, %.1f s", self.done, self.n,
                     100 * self.done_bytes / self.total, el)  # fmt: skip
            self._next = min(1.0, (int(10 * self.done_bytes / self.total) + 1) / 10)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _run_all(
    jobs: list[ModulePlan], ft: Checkpoint, base: Checkpoint, opts: _Options,
    dev: torch.device, spill: _Spill, workers: int, bar: _Progress,
) -> list[_Done]:  # fmt: skip
    """Every job on ``workers`` threads (torch releases the GIL in its kernels); results in
    job order. The first failure (or a stop signal in the main thread) cancels the rest and
    waits for the running ones before it is raised."""
    results: list[_Done | None] = [None] * len(jobs)
    if workers <= 1:
        for i, j in enumerate(jobs):
            results[i] = _run_job(j, ft, base, opts, dev, spill)
            bar.advance(j)
        return results  # type: ignore[return-value]
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="extract-lora")
    pending: set[Future] = set()
    index: dict[Future, int] = {}
    try:
        it = iter(enumerate(jobs))
        ahead = 2 * workers  # a short queue: a failure stops the run soon, memory stays bounded

        def submit() -> bool:
            nxt = next(it, None)
            if nxt is None:
                return False
            f = pool.submit(_run_job, nxt[1], ft, base, opts, dev, spill)
            index[f] = nxt[0]
            pending.add(f)
            return True

        while len(pending) < ahead and submit():
            pass
        while pending:
            done, _ = wait(pending, return_when=FIRST_EXCEPTION)
            for f in done:
                pending.discard(f)
                i = index.pop(f)
                results[i] = f.result()
                bar.advance(jobs[i])
                submit()
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
    return results  # type: ignore[return-value]


def _task_type(config: dict | None) -> str | None:
    for arch in (config or {}).get("architectures") or []:
        for suffix, task in _TASK_TYPES:
            if str(arch).endswith(suffix):
                return task
    return None


def _targets(lora: list[str], candidates: list[str]) -> list[str]:
    """PEFT ``target_modules``: the last name components (compact, as mergekit writes them)
    when every 2-D module of the model with that ending is extracted, else the full names
    (PEFT would otherwise wrap modules that have no factors)."""
    ends = sorted({_last(m) for m in lora})
    chosen = set(lora)
    if all(m in chosen for m in candidates if _last(m) in ends):
        return ends
    return sorted(lora)


def _adapter_config(base_spec: str, ft: Checkpoint, ranks: dict[str, int], embed: set[str],
                    saved: list[str], lora_bias: bool, fan_in_fan_out: bool,
                    candidates: list[str]) -> dict[str, Any]:  # fmt: skip
    r = max(ranks.values(), default=1)
    pattern = {m: k for m, k in ranks.items() if k != r}
    return {
        "base_model_name_or_path": base_spec,
        "peft_type": "LORA",
        "task_type": _task_type(ft.config),
        "inference_mode": True,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": _targets(list(ranks), candidates),
        "modules_to_save": saved or None,
        "lora_dropout": 0.0,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "lora_bias": lora_bias,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
    }


def _card(base: str, finetuned: str, result: dict[str, Any]) -> str:
    from mergeforge.version import __version__

    errs = [t["rel_error"] for t in result["tensors"] if t["kind"].startswith("lora")]
    mean = sum(errs) / len(errs) if errs else 0.0
    lines = [
        "---",
        f"base_model: {json.dumps(base)}",
        "library_name: peft",
        "tags:",
        "- mergeforge",
        "- peft",
        "- lora",
        "---",
        "# LoRA adapter extracted with mergeforge",
        "",
        f"Extracted with mergeforge {__version__} (`mergeforge extract-lora`) from the difference "
        f"between `{finetuned}` and its base `{base}`: rank {result['rank']}, "
        f"{result['svd']} SVD, {len(errs)} LoRA modules"
        + (f", {len(result['modules_to_save'])} saved whole" if result["modules_to_save"] else "")
        + ".",
        "",
        f"Relative reconstruction error ‖ΔW − BA‖_F / ‖ΔW‖_F: mean {mean:.4g}, max "
        f"{max(errs, default=0.0):.4g} (every tensor: `{REPORT}`).",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), OUT)",
        "```",
    ]
    return "\n".join(lines) + "\n"


def check_output(out: str | Path, inputs: Iterable[tuple[str, Path]], *, overwrite: bool) -> None:
    """The output checks of ``mergeforge merge`` for an adapter folder, touching nothing: it can
    be written where it is, is not, contains and lies inside no input, and is absent, empty or
    (``overwrite``) an earlier extract-lora output holding nothing else."""
    out = Path(out)
    check_output_location(out)
    check_not_among(out, inputs, producer="LoRA extraction")
    check_replaceable(out, overwrite=overwrite, markers=MARKERS, written=WRITTEN,
                      producer="LoRA extraction", carried=False)  # fmt: skip
    probe_writable(out)


def is_previous_adapter(folder: Path) -> bool:
    """``folder`` holds an earlier extract-lora output and nothing else: what ``overwrite`` may
    replace."""
    return is_previous_output(folder, markers=MARKERS, written=WRITTEN, carried=False)


def extract_lora(
    finetuned: str | os.PathLike[str],
    base: str | os.PathLike[str],
    out: str | os.PathLike[str],
    rank: int,
    *,
    clamp_rank: bool = False,
    svd: str = "gram",
    embed_lora: bool = False,
    save_modules: Sequence[str] = (),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    skip_undecomposable: bool = False,
    distribute_scale: bool = True,
    sv_epsilon: float = 0.0,
    oversample: int = 10,
    power_iters: int = 2,
    seed: int = 0,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    durable: bool = False,
    write_card: bool = True,
    progress: bool | None = None,
) -> ExtractResult:
    """Extract a rank-``rank`` PEFT LoRA adapter of ``finetuned`` relative to ``base`` into the
    folder ``out`` (see the module docstring), atomically. ``finetuned``/``base``: what
    ``mergeforge merge`` accepts (folders, files, Hugging Face ids, ``BASE+ADAPTER``).

    ``clamp_rank``: a matrix smaller than ``rank`` gets its full rank (mergekit's
    ``--max-rank``) instead of an error. ``svd``: ``exact`` | ``gram`` | ``randomized``
    (``oversample``, ``power_iters``, ``seed``). ``dtype``: of the written tensors (default:
    each tensor's dtype in ``finetuned``). ``workers``: modules decomposed at once (default 2 on
    a multi-core machine). ``durable``: fsync the files before the folder appears.
    ``write_card=False``: no README.md (mergekit's ``--no-write-model-card``).
    ``progress``: ``None`` = a bar on a terminal, log lines otherwise; ``False`` = silent.

    Every check runs before any tensor is read; an error, Ctrl-C or SIGTERM leaves nothing at
    ``out`` (and a previous output there as it was)."""
    t0 = time.perf_counter()
    if svd not in SVD_METHODS:
        raise ConfigError(f"--svd {svd!r} is not one of {', '.join(SVD_METHODS)}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if not (sv_epsilon >= 0 and math.isfinite(sv_epsilon)):
        raise ConfigError(f"--sv-epsilon must be a finite number >= 0, got {sv_epsilon}")
    if oversample < 0 or power_iters < 0:
        raise ConfigError("--oversample and --power-iters must be >= 0")
    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    dev = resolve_device(device)
    out = Path(out)
    check_output_location(out)
    ft_spec, base_spec = os.fspath(finetuned), os.fspath(base)
    both = os.path.exists(ft_spec) and os.path.exists(base_spec)
    if both and os.path.samefile(ft_spec, base_spec):
        raise ConfigError(
            f"FINETUNED and BASE are the same model ({ft_spec}); there is no difference to "
            "extract. Pass the fine-tuned model and its base."
        )
    ft = open_checkpoint(ft_spec)
    base_ck = None
    try:
        base_ck = open_checkpoint(base_spec)
        inputs = [(ft_spec, p) for p in checkpoint_paths(ft)]
        inputs += [(base_spec, p) for p in checkpoint_paths(base_ck)]
        check_output(out, inputs, overwrite=overwrite)
        jobs, notes = plan_extraction(
            ft, base_ck, rank=rank, clamp_rank=clamp_rank, embed_lora=embed_lora,
            save_modules=save_modules, include=include, exclude=exclude,
            skip_undecomposable=skip_undecomposable,
        )  # fmt: skip
        opts = _Options(rank, clamp_rank, svd, distribute_scale, float(sv_epsilon), oversample,
                        power_iters, seed, dtype)  # fmt: skip
        return _extract(jobs, notes, ft, base_ck, opts, dev, out, ft_spec=ft_spec,
                        base_spec=base_spec, workers=workers, overwrite=overwrite,
                        durable=durable, write_card=write_card, progress=progress,
                        t0=t0)  # fmt: skip
    finally:
        ft.close()
        if base_ck is not None:
            base_ck.close()


def _extract(jobs: list[ModulePlan], notes: list[str], ft: Checkpoint, base: Checkpoint,
             opts: _Options, dev: torch.device, out: Path, *, ft_spec: str, base_spec: str,
             workers: int | None, overwrite: bool, durable: bool, write_card: bool,
             progress: bool | None, t0: float) -> ExtractResult:  # fmt: skip
    if workers is None:
        workers = 2 if (os.cpu_count() or 1) > 1 else 1
    staging = Staging(out, overwrite=overwrite, replaceable=is_previous_adapter)
    spill = None
    bar = None
    try:
        spill = _Spill(staging.path / ".lora-factors.spill")
        bar = _Progress(sum(j.nbytes for j in jobs), len(jobs), progress)
        done = _run_all(jobs, ft, base, opts, dev, spill, workers, bar)
        bar.close()
        bar = None
        entries: list[_Entry] = []
        ranks: dict[str, int] = {}
        embed: set[str] = set()
        saved: list[str] = []
        pairs = list(zip(jobs, done, strict=True))
        for j, d in pairs:
            entries += d.entries
            if d.rank > 0:
                ranks[j.module] = d.rank
                if j.action == "lora_embedding":
                    embed.add(j.module)
            elif j.action == "save" and d.entries:
                saved.append(j.module)
        # a LoRA module whose weight gives no factors (unchanged, or below --sv-epsilon) but
        # whose bias changed (a BitFit-style change): its bias is never dropped. With PEFT's
        # lora_bias (one flag for every LoRA layer; embeddings cannot have it) it is a zero
        # rank-1 LoRA carrying the bias; else the module is saved whole (modules_to_save)
        bias_only = [(j, d) for j, d in pairs if j.action != "save" and d.rank == 0
                     and d.bias_changed]  # fmt: skip
        lora_like = [j for j, d in pairs if d.rank > 0] + [j for j, _ in bias_only]
        changed_bias = [j.module for j, d in pairs if d.bias_changed and j.action != "save"]
        has_bias = {j.module: d.bias_entry for j, d in pairs}
        lora_bias = (
            bool(changed_bias)
            and not embed
            and all(has_bias.get(j.module) is not None for j in lora_like)
        )
        for j, d in bias_only:
            assert d.report is not None
            if lora_bias:
                entries += _zero_lora(j, spill, opts.out_dtype or ft.info(j.weight).dtype)
                ranks[j.module] = 1
                d.report = replace(d.report, kind="lora", rank=1)
            else:
                params = [(p, n) for p, n in (("weight", j.weight), ("bias", j.bias)) if n]
                entries += [_Entry(f"{PREFIX}{j.module}.{p}", opts.out_dtype or ft.info(n).dtype,
                                   ft.info(n).shape, source=n) for p, n in params]  # fmt: skip
                saved.append(j.module)
                d.report = replace(d.report, kind="saved", rank=None, rel_error=0.0)
        if bias_only:
            how = ("a zero rank-1 LoRA with lora_bias" if lora_bias
                   else "the module saved whole (modules_to_save)")  # fmt: skip
            notes.append(f"{len(bias_only)} module(s) have a changed bias but no LoRA factors "
                         "(the weight is unchanged, or below --sv-epsilon); the bias is carried "
                         f"by {how}: {_shown([j.module for j, _ in bias_only], 3)}")  # fmt: skip
        if not ranks and not saved:
            raise ValidationError(
                f"{ft_spec} equals its base {base_spec} in every extracted tensor (weights and "
                "biases): the adapter would be all zeros (or hold nothing). Nothing was "
                "written; check that FINETUNED is the fine-tuned model."
            )
        if lora_bias:
            entries += [has_bias[j.module] for j in lora_like]
        elif changed_bias:
            lost = [m for m in changed_bias if m in ranks]
            if lost:
                notes.append(f"the bias of {len(lost)} LoRA module(s) changed but is not in the "
                             "adapter (PEFT's lora_bias needs a bias on every LoRA layer and no "
                             f"embedding LoRA): {_shown(lost, 3)}")  # fmt: skip
        if not ranks:  # PEFT loads no adapter without a LoRA layer: a zero one, a no-op
            spare = next((j for j, d in pairs if j.action == "lora" and d.rank == 0
                          and j.module not in saved and j.weight is not None), None)  # fmt: skip
            if spare is not None:
                entries += _zero_lora(spare, spill, opts.out_dtype or ft.info(spare.weight).dtype)
                ranks[spare.module] = 1
                notes.append(f"no module has LoRA factors; PEFT needs one LoRA layer to load "
                             f"an adapter, so {spare.module} has a zero rank-1 one "
                             "(a no-op)")  # fmt: skip
        lora_modules = [j for j in jobs if j.module in ranks]
        skipped = [
            j.module
            for j, d in zip(jobs, done, strict=True)
            if d.report is not None and d.report.kind == "unchanged" and d.report.rank == 0
        ]
        if skipped:
            notes.append(f"{len(skipped)} module(s) have no singular value above --sv-epsilon "
                         f"{opts.sv_epsilon} and are left out: {_shown(skipped, 3)}")  # fmt: skip
        candidates = [k.removesuffix(".weight") for k in ft.keys()
                      if k.endswith(".weight") and len(ft.info(k).shape) == 2]  # fmt: skip
        conv1d = any(j.transpose and j.action == "lora" for j in lora_modules)
        config = _adapter_config(base_spec, ft, ranks, embed, saved, lora_bias, conv1d,
                                 candidates)  # fmt: skip
        tensors = tuple(d.report for d in done if d.report is not None)
        meta = {"format": "pt", "mergeforge_svd": opts.svd}
        size = _write_safetensors(staging.path / ADAPTER_WEIGHTS, entries, spill, ft, meta)
        spill.close()
        seconds = time.perf_counter() - t0
        report = {
            "finetuned": ft_spec,
            "base": base_spec,
            "rank": config["r"],
            "requested_rank": opts.rank,
            "clamp_rank": opts.clamp_rank,
            "svd": opts.svd,
            **(
                {"oversample": opts.oversample, "power_iters": opts.power_iters, "seed": opts.seed}
                if opts.svd == "randomized"
                else {}
            ),  # fmt: skip
            "distribute_scale": opts.distribute_scale,
            "sv_epsilon": opts.sv_epsilon,
            "modules_to_save": saved,
            "lora_bias": lora_bias,
            "seconds": round(seconds, 3),
            "notes": notes,
            "tensors": [
                {
                    "module": t.module,
                    "kind": t.kind,
                    "shape": list(t.shape),
                    "rank": t.rank,
                    "rel_error": t.rel_error,
                    "bias": t.bias,
                }
                for t in tensors
            ],  # fmt: skip
        }
        from mergeforge.version import __version__

        report["mergeforge_version"] = __version__
        files = {
            ADAPTER_CONFIG: json.dumps(config, indent=2) + "\n",
            REPORT: json.dumps(report, indent=2) + "\n",
        }
        if write_card:
            files["README.md"] = _card(base_spec, ft_spec, report)
        for name, text in files.items():
            (staging.path / name).write_text(text, encoding="utf-8")
        if durable:
            for name in (ADAPTER_WEIGHTS, *files):
                fsync_path(staging.path / name)
        staging.commit()
    except OSError as e:
        if staging.committed:
            raise
        raise CheckpointError(
            f"{out}: writing the adapter failed ({e.strerror or e}); check free disk space and "
            "permissions. Nothing was written."
        ) from None
    finally:
        if bar is not None:
            bar.close()
        if spill is not None:
            spill.close()
        if not staging.committed:
            staging.abort()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return ExtractResult(
        out=out, rank=config["r"], svd=opts.svd, modules=len(ranks), saved=tuple(saved),
        tensors=tensors, bytes_written=size, seconds=time.perf_counter() - t0,
        peak_rss_bytes=peak, notes=tuple(notes),
    )  # fmt: skip


# ---- the report on stderr ----------------------------------------------------------------


def report_rows(result: ExtractResult) -> list[tuple[str, str, str, str, str]]:
    """``(module, kind, shape, rank, relative error)`` per module in the adapter."""
    rows = []
    for t in result.tensors:
        if t.kind == "unchanged":
            continue
        rank = "full" if t.kind == "saved" else str(t.rank)
        err = "0 (whole)" if t.kind == "saved" else f"{t.rel_error:.4e}"
        rows.append((t.module, t.kind, "x".join(map(str, t.shape)), rank, err))
    return rows


def print_report(result: ExtractResult, file: Any = None) -> None:
    """The per-tensor error table, then a summary line and the notes, on ``file`` (stderr):
    a rich table on a terminal, plain whole lines elsewhere (a pipe, a log)."""
    file = sys.stderr if file is None else file
    rows = report_rows(result)
    cols = ("module", "kind", "shape", "rank", "‖ΔW−BA‖/‖ΔW‖")
    summary = (
        f"{result.modules} LoRA module(s), rank {result.rank} ({result.svd} SVD): relative "
        f"error mean {result.mean_error:.4e}, max {result.max_error:.4e}"
        + (f"; {len(result.saved)} module(s) saved whole" if result.saved else "")
    )
    lines = [summary, *(f"note: {n}" for n in result.notes)]
    if file.isatty():
        from rich import box
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        con = Console(file=file, highlight=False)
        table = Table(box=box.SIMPLE_HEAD)
        for i, c in enumerate(cols):  # the numbers stay whole; a long module name folds
            width = max([len(c), *(len(r[i]) for r in rows)])
            if i == 0:
                table.add_column(c, overflow="fold", ratio=1)
            else:
                right = c.startswith(("rank", "rel"))
                table.add_column(c, no_wrap=True, min_width=width,
                                 justify="right" if right else "left")  # fmt: skip
        for r in rows:
            table.add_row(*map(escape, r))
        con.print(table)
        for line in lines:
            con.print(line, markup=False)
        return
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(cols)]
    for r in [cols, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip(), file=file)
    for line in lines:
        print(line, file=file)


__all__ = [
    "ExtractResult", "TensorError", "ModulePlan", "extract_lora", "plan_extraction",
    "lora_factors", "truncated_svd", "print_report", "report_rows", "check_output",
    "is_previous_adapter", "MARKERS", "SVD_METHODS",
]  # fmt: skip
