"""Vocabularies: the output tokenizer, and embedding / LM-head rows realigned by token string.

mergekit's ``tokenizer_source`` (``union`` | ``base`` | a model) and ``tokenizer:`` block
(``source``, per-token ``tokens``, ``pad_to_multiple_of``), with mergekit 0.1.5's meaning:

* **the output vocabulary**: ``base``: the base model's tokenizer (the first model's without a
  base), less any token whose id is past its ``vocab_size``; a model: that model's tokenizer;
  ``union``: the base's, then every token of the other models it lacks, appended in model
  order (the config's), each model's in id order; tokens a tokenizer *adds* (special and added
  tokens) keep their settings (the first model's when two differ). A token named in
  ``tokenizer.tokens`` that the vocabulary lacks is appended.
* **the rows**: before the merge method runs, each input's vocabulary tensors (embeddings,
  LM heads: :func:`is_vocab_tensor`) are rebuilt on the output vocabulary, row by row: a token
  the input has keeps the input's row; a token it lacks, or any token whose
  ``tokens`` entry says ``force: true``, gets the *fill row*, the same for every input of
  the tensor: the entry's ``source`` (the token's row in that model, zeros, or another token's
  row), else the one input that has the token, else zeros when none has it, else the base
  model's row when the base is an input of the tensor and has it, else the mean of the rows
  of the inputs that have it. With ``pad_to_multiple_of`` the rows past the vocabulary are
  each input's mean row. Then every method merges aligned rows; every other tensor is
  untouched, and only the vocabulary tensors' jobs read more than their own inputs (nothing:
  the fill rows come from the same job's inputs).

What needs only tokenizer files and headers is done at plan time (:func:`plan_vocabulary`,
:meth:`VocabPlan.job_shape`): missing tokenizers, the output vocabulary, each model's row map,
each tensor's fill rule, every named source token. The executor calls :meth:`VocabPlan.realign`
per job; the output folder gets :meth:`VocabPlan.save`'s tokenizer and ``config.json`` the
number of rows (:meth:`VocabPlan.update_config`).

Without a tokenizer option nothing is realigned: :func:`check_ids_agree` refuses inputs whose
tokenizers give one token different ids (mergekit would merge those rows by id, silently).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mergeforge.checkpoint import Checkpoint
from mergeforge.checkpoint.tokenizer import (
    config_vocab_size,
    copy_tokenizer,
    load_tokenizer,
    read_token_ids,
    strip_tokenizer,
    tokenizer_file,
    vocab_size_key,
)
from mergeforge.config import VOCAB_DOCS, MergeConfig, TokenSetting
from mergeforge.errors import ConfigError, ValidationError

log = logging.getLogger("mergeforge")

VOCAB_TENSORS = frozenset({
    # decoders (the Llama family and most causal LMs), their heads
    "model.embed_tokens.weight", "lm_head.weight", "lm_head.bias",
    "model.tok_embeddings.weight", "output.weight",  # InternLM2
    "transformer.wte.weight", "wte.weight",  # GPT-2 (and its alias), Qwen, Exaone, JAIS...
    "transformer.word_embeddings.weight",  # Falcon
    "transformer.embd.wte.weight", "lm_head.linear.weight", "lm_head.linear.bias",  # phi-2 (old)
    "transformer.embedding.word_embeddings.weight", "transformer.output_layer.weight",  # ChatGLM
    "gpt_neox.embed_in.weight", "embed_out.weight",  # GPT-NeoX
    "backbone.embeddings.weight",  # Mamba
    "layers.0.wte.weight",  # phi-1 (its head: VOCAB_PATTERNS)
    # encoders (BERT, RoBERTa, DistilBERT) and their masked-LM heads
    "bert.embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight",
    "roberta.embeddings.word_embeddings.weight", "distilbert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.weight", "cls.predictions.bias", "lm_head.decoder.weight",
    "vocab_projector.weight", "vocab_projector.bias",
    # modular architectures: a module's weights under its prefix
    "shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight",  # T5
    "model.decoder.embed_tokens.weight",  # Whisper's decoder
    # Gemma 3, Llama 4, Mistral 3: module text_decoder, prefix "language_model."
    "language_model.model.embed_tokens.weight", "language_model.lm_head.weight",
    "model.language_model.embed_tokens.weight",  # Qwen3-VL
})  # fmt: skip
"""Tensors indexed by token id along their first axis, by full name: the weights of mergekit
0.1.5's architecture tables that have a ``vocabulary_axis`` (all of them axis 0), with their
aliases, each under its module's ``weight_prefix`` in the modular architectures (a Gemma 3,
Llama 4 or Mistral 3 checkpoint's ``language_model.model.embed_tokens.weight``). With
:data:`VOCAB_PATTERNS`; checked against mergekit's tables by tests/test_vocab.py."""

VOCAB_PATTERNS = (re.compile(r"layers\.\d+\.linear\.(?:weight|bias)"),)
"""Vocabulary tensors whose name holds the layer count (``fullmatch``): phi-1's head,
``layers.${num_layers}.linear.*`` in mergekit's table."""

NON_VOCAB_TENSORS = frozenset({
    "backbone.norm_f.weight", "bert.embeddings.LayerNorm.beta", "bert.embeddings.LayerNorm.bias",
    "bert.embeddings.LayerNorm.gamma", "bert.embeddings.LayerNorm.weight",
    "bert.embeddings.position_embeddings.weight", "bert.embeddings.position_ids",
    "bert.embeddings.token_type_embeddings.weight", "bert.pooler.dense.bias",
    "bert.pooler.dense.weight", "classifier.bias", "classifier.dense.bias",
    "classifier.dense.weight", "classifier.out_proj.bias", "classifier.out_proj.weight",
    "classifier.weight", "decoder.final_layer_norm.weight",
    "distilbert.embeddings.LayerNorm.beta", "distilbert.embeddings.LayerNorm.bias",
    "distilbert.embeddings.LayerNorm.gamma", "distilbert.embeddings.LayerNorm.weight",
    "distilbert.embeddings.position_embeddings.weight", "embeddings.LayerNorm.beta",
    "embeddings.LayerNorm.bias", "embeddings.LayerNorm.gamma", "embeddings.LayerNorm.weight",
    "embeddings.position_embeddings.weight", "embeddings.position_ids",
    "embeddings.token_type_embeddings.weight", "encoder.final_layer_norm.weight",
    "gpt_neox.final_layer_norm.bias", "gpt_neox.final_layer_norm.weight",
    "language_model.model.norm.weight", "lm_head.dense.bias", "lm_head.dense.weight",
    "lm_head.layer_norm.bias", "lm_head.layer_norm.weight", "lm_head.ln.bias",
    "lm_head.ln.weight", "ln_f.bias", "ln_f.weight", "model.decoder.embed_positions.weight",
    "model.decoder.layer_norm.bias", "model.decoder.layer_norm.weight",
    "model.embedding_norm.weight", "model.encoder.conv1.bias", "model.encoder.conv1.weight",
    "model.encoder.conv2.bias", "model.encoder.conv2.weight",
    "model.encoder.embed_positions.weight", "model.encoder.layer_norm.bias",
    "model.encoder.layer_norm.weight", "model.final_layernorm.bias",
    "model.final_layernorm.weight", "model.language_model.norm.weight", "model.norm.bias",
    "model.norm.weight", "model.visual.merger.linear_fc1.bias",
    "model.visual.merger.linear_fc1.weight", "model.visual.merger.linear_fc2.bias",
    "model.visual.merger.linear_fc2.weight", "model.visual.merger.norm.bias",
    "model.visual.merger.norm.weight", "model.visual.patch_embed.proj.bias",
    "model.visual.patch_embed.proj.weight", "model.visual.pos_embed.weight",
    "multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_2.weight",
    "multi_modal_projector.mm_input_projection_weight",
    "multi_modal_projector.mm_soft_emb_norm.weight", "multi_modal_projector.norm.weight",
    "multi_modal_projector.patch_merger.merging_layer.weight", "pooler.dense.bias",
    "pooler.dense.weight", "pre_classifier.bias", "pre_classifier.weight",
    "roberta.embeddings.LayerNorm.bias", "roberta.embeddings.LayerNorm.weight",
    "roberta.embeddings.position_embeddings.weight", "roberta.embeddings.position_ids",
    "roberta.embeddings.token_type_embeddings.weight", "score.bias", "score.weight",
    "transformer.encoder.final_layernorm.weight", "transformer.ln_f.bias",
    "transformer.ln_f.weight", "transformer.relative_pe.slopes",
    "transformer.rotary_pos_emb.inv_freq", "transformer.wpe.weight",
    "vision_model.class_embedding", "vision_model.layernorm_post.bias",
    "vision_model.layernorm_post.weight", "vision_model.layernorm_pre.bias",
    "vision_model.layernorm_pre.weight", "vision_model.patch_embedding.linear.weight",
    "vision_model.positional_embedding_vlm", "vision_model.vision_adapter.mlp.fc1.weight",
    "vision_model.vision_adapter.mlp.fc2.weight", "vision_tower.ln_pre.weight",
    "vision_tower.patch_conv.weight", "vision_tower.vision_model.embeddings.patch_embedding.bias",
    "vision_tower.vision_model.embeddings.patch_embedding.weight",
    "vision_tower.vision_model.embeddings.position_embedding.weight",
    "vision_tower.vision_model.post_layernorm.bias",
    "vision_tower.vision_model.post_layernorm.weight", "visual.merger.ln_q.bias",
    "visual.merger.ln_q.weight", "visual.patch_embed.proj.weight", "vocab_layer_norm.bias",
    "vocab_layer_norm.weight", "vocab_transform.bias", "vocab_transform.weight", "wpe.weight",
})  # fmt: skip
"""The weights outside the numbered layers that mergekit 0.1.5's tables list *without* a
vocabulary axis (norms, position embeddings, vision towers, classifier heads), under their
module prefixes: known not to be indexed by token, whatever their size. No weight of those
tables' layer templates has a vocabulary axis, so a tensor of a numbered layer is known not to
be one either (:func:`known_non_vocabulary`)."""

_NUMBERED = re.compile(r"(?:^|\.)\d+\.")


def is_vocab_tensor(name: str) -> bool:
    """Whether tensor ``name`` is indexed by token id along its first axis (a vocabulary
    tensor of mergekit's architecture tables: :data:`VOCAB_TENSORS`, :data:`VOCAB_PATTERNS`)."""
    return name in VOCAB_TENSORS or any(p.fullmatch(name) for p in VOCAB_PATTERNS)


def known_non_vocabulary(name: str) -> bool:
    """Whether tensor ``name`` is known not to be indexed by token: a weight of a numbered
    layer, or one of :data:`NON_VOCAB_TENSORS`."""
    return not is_vocab_tensor(name) and (
        name in NON_VOCAB_TENSORS or _NUMBERED.search(name) is not None
    )


CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{% for message in messages %}"
        "{% if loop.first %}{{ bos_token }}{% endif %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{{ message['content'] | trim }}{{ '<|eot_id|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "mistral": (
        "{% set has_system = messages[0]['role'] == 'system' %}"
        "{% set turns = messages[1:] if has_system else messages %}"
        "{{ bos_token }}"
        "{% for message in turns %}"
        "{% if (message['role'] == 'user') != (loop.index0 is even) %}"
        "{{ raise_exception('After the optional system message, conversation roles must "
        "alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}"
        "{% if loop.first and has_system %}"
        "{{ ' [INST] ' + messages[0]['content'] + '\\n\\n' + message['content'] + ' [/INST]' }}"
        "{% else %}{{ ' [INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported, with the "
        "exception of an initial optional system message!') }}{% endif %}"
        "{% endfor %}"
    ),
}
"""``chat_template: NAME``: mergeforge's templates, which render every conversation as
mergekit 0.1.5's templates of the same names do (tests/test_vocab.py compares them)."""


def tokenizer_source(cfg: MergeConfig) -> str | None:
    """The config's output vocabulary: ``union``, ``base``, a model reference, or ``None``."""
    return cfg.tokenizer.source if cfg.tokenizer is not None else cfg.tokenizer_source


def _same_path(a: str, b: str) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


def _model_index(models: Sequence[str], spec: str) -> int | None:
    return next((i for i, m in enumerate(models) if _same_path(m, spec)), None)


# ----------------------------------------------------------------------------------------------
# the plan


@dataclass
class Fill:
    """The fill rows of one tensor's inputs (``models``, in job order, each once): which
    output tokens take a fill row instead of the input's own row, and where it comes from."""

    models: tuple[int, ...]
    ids: Tensor
    """Output token ids that take the fill row in some input (long)."""
    own: Tensor
    """``[len(models), len(ids)]`` bool: that input keeps its own row for that token."""
    from_row: list[tuple[int, Tensor, Tensor]]
    """``(position in models, positions in ids, rows of that input)``: copied rows."""
    mean: Tensor
    """Positions in ``ids`` filled with the mean of the inputs that have the token."""


@dataclass
class VocabPlan:
    """The vocabulary of a merge: the output tokenizer (written beside the model), each model's
    row map, and the realignment of the vocabulary tensors (see the module docstring)."""

    tokenizer: Any
    """The output tokenizer (``transformers``), or ``None`` when none is written."""
    models: list[str]
    maps: list[Tensor | None] = field(default_factory=list)
    """Per model: output token id -> the model's row, -1 where it lacks the token (long)."""
    n_tokens: int = 0
    size: int | None = None
    """Rows of the output's vocabulary tensors (``n_tokens`` padded); ``None``: no change."""
    forced: Tensor | None = None
    """Output token ids whose ``tokens`` entry says ``force: true`` (long)."""
    settings: dict[int, tuple[str, int | None, int | None]] = field(default_factory=dict)
    """Output token id -> its ``tokens`` source: ``("zero", None, None)``, ``("model", m,
    None)`` (its own row in model m) or ``("model_token", m, row)``."""
    token_names: dict[int, str] = field(default_factory=dict)
    """Output token id -> string, for the tokens that errors and warnings name."""
    base: int | None = None
    tensors: set[str] = field(default_factory=set)
    """Output tensors realigned (the vocabulary tensors whose inputs are not already aligned)."""
    fills: dict[str, Fill] = field(default_factory=dict)
    _cache: dict[tuple, Fill] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)
    source_folder: Path | None = None
    """The folder the output tokenizer is read from when ``tokenizer_source`` names a model
    that is not merged: an input of the merge all the same (``engine/output.input_paths``)."""
    source_name: str | None = None
    """That ``tokenizer_source`` as the config spells it."""

    # -- plan time ---------------------------------------------------------------------------

    def realigns(self, name: str) -> bool:
        """Whether output tensor ``name`` is a vocabulary tensor of a realigning plan."""
        return self.size is not None and is_vocab_tensor(name)

    def job_shape(self, out_name: str, refs: Sequence[Any], infos: Sequence[Any], base: int | None,
                  where: str) -> tuple[int, ...]:  # fmt: skip
        """The output shape of vocabulary tensor ``out_name`` merged from ``refs`` (the job's
        input refs, base first; ``infos`` their TensorInfo; ``base`` the config's base model
        of this tensor): checks the inputs (same shape past the first axis, a row for every
        token their map names), records the fill rule, and returns ``(rows, *rest)``."""
        assert self.size is not None
        rest = tuple(infos[0].shape[1:])
        for r, info in zip(refs, infos, strict=True):
            if tuple(info.shape[1:]) != rest or not info.shape:
                raise ValidationError(
                    f"shape mismatch for tensor {r.name!r}: {self.models[r.model]} ({info.file}) "
                    f"has {list(info.shape)} but {self.models[refs[0].model]} has "
                    f"{list(infos[0].shape)}; only the vocabulary axis (the first) may differ "
                    f"({where})."
                )
            m = self.maps[r.model]
            need = int(m.max()) + 1 if m is not None and m.numel() else 0
            if info.shape[0] < need:
                raise ValidationError(
                    f"{self.models[r.model]}: tensor {r.name!r} ({info.file}) has "
                    f"{info.shape[0]} rows but its tokenizer and config.json vocab_size give "
                    f"token ids up to {need - 1}; the checkpoint and its tokenizer do not match."
                )
        models = tuple(dict.fromkeys(r.model for r in refs))
        aligned = all(
            self.maps[r.model] is not None
            and info.shape[0] == self.n_tokens == self.size
            and torch.equal(self.maps[r.model], torch.arange(self.n_tokens))
            for r, info in zip(refs, infos, strict=True)
        )
        if aligned and (self.forced is None or not self.forced.numel()):
            return tuple(infos[0].shape)
        key = (models, base)
        if key not in self._cache:
            self._cache[key] = self._fill(models, base, out_name)
        fill = self._cache[key]
        rows = {r.model: info.shape[0] for r, info in zip(refs, infos, strict=True)}
        for pos, _, src_rows in fill.from_row:
            if src_rows.numel() and int(src_rows.max()) >= rows[models[pos]]:
                bad = int(src_rows.max())
                raise ValidationError(
                    f"tokenizer.tokens: a model_token source reads row {bad} of "
                    f"{self.models[models[pos]]}'s {out_name!r}, which has "
                    f"{rows[models[pos]]} rows. Choose a token id below that."
                )
        self.fills[out_name] = fill
        self.tensors.add(out_name)
        return (self.size, *rest)

    def _fill(self, models: tuple[int, ...], base: int | None, out_name: str) -> Fill:
        """The fill rule of a tensor whose inputs are ``models`` (see the module docstring)."""
        maps = torch.stack([self._map(m) for m in models])  # [k, n]
        present = maps >= 0
        count = present.sum(0)
        need = count < len(models)
        if self.forced is not None and self.forced.numel():
            need[self.forced] = True
        ids = need.nonzero().flatten()
        forced = torch.zeros(self.n_tokens, dtype=torch.bool)
        if self.forced is not None:
            forced[self.forced] = True
        own = present[:, ids] & ~forced[ids]
        pos_of = {m: p for p, m in enumerate(models)}
        copies: dict[int, tuple[list[int], list[int]]] = {}
        mean: list[int] = []
        zero_tokens: list[str] = []
        rows_of = maps[:, ids].T.tolist()  # per needed token: each input's row or -1
        counts = count[ids].tolist()
        b = pos_of.get(base) if base is not None else None
        for k, (j, rows, n) in enumerate(zip(ids.tolist(), rows_of, counts, strict=True)):
            setting = self.settings.get(j)
            if setting is not None:
                kind, m, row = setting
                if kind == "zero":
                    continue
                token = self.token_names[j]
                if m not in pos_of:
                    raise ValidationError(
                        f"tokenizer.tokens[{token!r}]: its source {self.models[m]} is not an input "
                        f"of tensor {out_name!r} (its inputs: "
                        f"{', '.join(self.models[x] for x in models)}); choose one of those."
                    )
                if kind == "model":
                    row = rows[pos_of[m]]
                    if row < 0:
                        raise ValidationError(
                            f"tokenizer.tokens[{token!r}]: its source {self.models[m]} has no "
                            f"token {token!r}; choose a model that has it, {{kind: zero}}, or "
                            "{kind: model_token, model: ..., token: ...}."
                        )
                c = copies.setdefault(pos_of[m], ([], []))
                c[0].append(k)
                c[1].append(row)
                continue
            if n == 0:
                zero_tokens.append(self.token_names.get(j, str(j)))
                continue
            p = next(x for x, r in enumerate(rows) if r >= 0) if n == 1 else b
            if p is not None and rows[p] >= 0:  # the one input that has it, else the base
                c = copies.setdefault(p, ([], []))
                c[0].append(k)
                c[1].append(rows[p])
            else:
                mean.append(k)
        if zero_tokens:
            self.summary.append(
                f"{len(zero_tokens)} token(s) are in no input's vocabulary and get zero rows "
                f"in {out_name!r}: {', '.join(map(repr, zero_tokens[:5]))}"
                + (" ..." if len(zero_tokens) > 5 else "")
            )
        return Fill(
            models=models, ids=ids, own=own,
            from_row=[(p, torch.tensor(ks, dtype=torch.long), torch.tensor(rs, dtype=torch.long))
                      for p, (ks, rs) in sorted(copies.items())],
            mean=torch.tensor(mean, dtype=torch.long),
        )  # fmt: skip

    def check_sidecars(self, jobs: Sequence[Any]) -> None:
        """Statistics of a realigned tensor (a Fisher sidecar of the embeddings) are rows of
        the input's own vocabulary: refused, naming the tensor, rather than misaligned."""
        for job in jobs:
            if job.out_name in self.tensors and any(s is not None for s in job.sidecars):
                raise ValidationError(
                    f"tensor {job.out_name!r}: its rows are realigned to the output vocabulary "
                    "but the method's statistics (sidecars) of it are not; merge it with "
                    f"'exclude: [{job.out_name!r}]' or a method that reads no statistics, or "
                    "merge models that share a tokenizer."
                )

    def check_unknown_rows(self, jobs: Sequence[Any], cks: Sequence[Checkpoint],
                           excluded: Sequence[re.Pattern[str]] = ()) -> None:  # fmt: skip
        """A plan that moves rows: refuse an output tensor that mergeforge neither realigns
        (:func:`is_vocab_tensor`) nor knows to be something else (:func:`known_non_vocabulary`)
        when an input of it has as many rows as an input's vocabulary (its config.json
        ``vocab_size``, or the rows of its vocabulary tensors): it may be indexed by token,
        and merged by id its rows would no longer match the realigned ones. A tensor the
        config's ``exclude`` names (copied unchanged) is the user's to judge."""
        if self.size is None or self._identity():
            return
        sizes: dict[int, int] = {}  # rows -> the model whose vocabulary has as many
        for m, ck in enumerate(cks):
            if (n := config_vocab_size(ck.config)) is not None:
                sizes.setdefault(n, m)
        for job in jobs:
            if is_vocab_tensor(job.out_name):
                for r in job.inputs:
                    if shape := cks[r.model].info(r.name).shape:
                        sizes.setdefault(shape[0], r.model)
        for job in jobs:
            name = job.out_name
            if is_vocab_tensor(name) or known_non_vocabulary(name):
                continue
            if any(p.search(name) for p in excluded):
                continue
            for r in (*([job.base] if job.base is not None else []), *job.inputs):
                info = cks[r.model].info(r.name)
                if not info.shape or info.shape[0] not in sizes:
                    continue
                rows, owner = info.shape[0], self.models[sizes[info.shape[0]]]
                raise ValidationError(
                    f"tensor {r.name!r} of {self.models[r.model]} ({info.file}) has {rows} "
                    f"rows, as many as the vocabulary of {owner}, but it is neither a "
                    "vocabulary tensor mergeforge knows (those of mergekit's architecture "
                    "tables, engine/vocab.py VOCAB_TENSORS) nor known to be anything else. "
                    f"The embedding rows are realigned to the output vocabulary ({self.size} "
                    "rows); merged by id, this tensor's rows would no longer match them. If its "
                    "rows are tokens, this architecture's vocabulary tensors are not known: "
                    "merge models that share a tokenizer, without a tokenizer option. If they "
                    "are not (its size only equals the vocabulary's), copy it unchanged from "
                    f"the base with 'exclude: [{name!r}]'."
                )

    def _identity(self) -> bool:
        """Every model's rows are the output's, in order: nothing moves."""
        forced = self.forced is not None and self.forced.numel() > 0
        return (
            not forced
            and self.size == self.n_tokens
            and all(
                mp is not None and torch.equal(mp, torch.arange(self.n_tokens)) for mp in self.maps
            )
        )

    def _map(self, m: int) -> Tensor:
        mp = self.maps[m]
        assert mp is not None
        return mp

    # -- run time ----------------------------------------------------------------------------

    def _inputs(self, out_name: str, models: Sequence[int], tensors: Sequence[Tensor],
                dtype: torch.dtype | None) -> tuple[Fill, list[Tensor], torch.dtype]:  # fmt: skip
        """The fill of ``out_name``, its inputs in the fill's order (each model once) and the
        dtype of the rebuilt rows (``dtype``, else the inputs' promoted dtype)."""
        fill = self.fills[out_name]
        first: dict[int, Tensor] = {}
        for m, t in zip(models, tensors, strict=True):
            first.setdefault(m, t)
        by_pos = [first[m] for m in fill.models]
        if dtype is None:
            dtype = by_pos[0].dtype
            for t in by_pos[1:]:
                dtype = torch.promote_types(dtype, t.dtype)
        return fill, by_pos, dtype

    def _default_rows(self, fill: Fill, by_pos: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
        """The fill rows: ``[len(fill.ids), *rest]``, row k the fill of token ``fill.ids[k]``
        (copied from one input, the mean of those that have it, or zero)."""
        t0 = by_pos[0]
        rest, dev = t0.shape[1:], t0.device
        ids = fill.ids.to(dev)
        default = torch.zeros((ids.numel(), *rest), dtype=dtype, device=dev)
        for p, ks, rows in fill.from_row:
            default[ks.to(dev)] = by_pos[p][rows.to(dev)].to(dtype)
        if fill.mean.numel():
            ks = fill.mean.to(dev)
            tok = ids[ks]
            acc = torch.zeros((ks.numel(), *rest), dtype=dtype, device=dev)
            count = torch.zeros(ks.numel(), dtype=torch.long, device=dev)
            for m, t in zip(fill.models, by_pos, strict=True):
                rows = self._map(m).to(dev)[tok]
                has = rows >= 0
                picked = t[rows.clamp(min=0)].to(dtype)
                acc = acc + torch.where(has.view(-1, *([1] * len(rest))), picked,
                                        torch.zeros((), dtype=dtype, device=dev))  # fmt: skip
                count += has
            default[ks] = acc / count.view(-1, *([1] * len(rest))).to(dtype)
        return default

    def realign(
        self, out_name: str, models: Sequence[int], tensors: Sequence[Tensor]
    ) -> list[Tensor]:
        """``tensors`` (one per job input, of models ``models``; a model may repeat) rebuilt on
        the output vocabulary: ``[size, *rest]`` each, in their dtype."""
        fill, by_pos, dtype = self._inputs(out_name, models, tensors, None)
        t0 = by_pos[0]
        rest, dev = t0.shape[1:], t0.device
        ids = fill.ids.to(dev)
        default = self._default_rows(fill, by_pos, dtype)
        out: dict[int, Tensor] = {}
        for p, (m, t) in enumerate(zip(fill.models, by_pos, strict=True)):
            mp = self._map(m).to(dev)
            assert self.size is not None
            new = torch.empty((self.size, *rest), dtype=dtype, device=dev)
            # index_select into the rows: ~10x faster than `new[:n] = t[idx]` (advanced
            # indexing's element-wise kernel plus a temporary) on a 32k x 1024 matrix
            torch.index_select(t if t.dtype == dtype else t.to(dtype), 0, mp.clamp(min=0),
                               out=new[: self.n_tokens])  # fmt: skip
            take = ~fill.own[p].to(dev)
            new[ids[take]] = default[take]
            if self.size > self.n_tokens:
                new[self.n_tokens :] = torch.mean(new[: self.n_tokens], dim=0)
            out[m] = new
        return [out[m] for m in models]

    def realign_rows(self, out_name: str, models: Sequence[int], tensors: Sequence[Tensor],
                     dtype: torch.dtype | None) -> Callable[[int, int], list[Tensor]]:  # fmt: skip
        """What :meth:`realign` gives, a block of rows at a time: ``rows(start, end)`` is rows
        ``start:end`` of each rebuilt tensor (in ``dtype``, else the inputs' promoted dtype),
        gathered from ``tensors`` (the stored ones, unconverted) on demand. For an element-wise
        merge (``engine.execute.merge_chunked``): no input is re-laid whole, so no fresh
        matrix per input is allocated and written. Only for plans without padding rows
        (``size == n_tokens``: a padding row is the mean of every row)."""
        assert self.size == self.n_tokens
        fill, by_pos, dtype = self._inputs(out_name, models, tensors, dtype)
        dev = by_pos[0].device
        default = self._default_rows(fill, by_pos, dtype)
        ids = fill.ids.to(dev)
        maps = [self._map(m).to(dev).clamp(min=0) for m in fill.models]
        takes = []  # per input: the output ids that take a fill row (ascending), their rows
        for p in range(len(fill.models)):
            pos = (~fill.own[p].to(dev)).nonzero().flatten()
            takes.append((ids[pos], pos))

        def rows(start: int, end: int) -> list[Tensor]:
            got: dict[int, Tensor] = {}
            bounds = torch.tensor([start, end], device=dev)
            for p, m in enumerate(fill.models):
                sel = torch.index_select(by_pos[p], 0, maps[p][start:end])
                if sel.dtype != dtype:
                    sel = sel.to(dtype)
                tid, pos = takes[p]
                lo, hi = torch.searchsorted(tid, bounds).tolist()
                if hi > lo:
                    sel[tid[lo:hi] - start] = default[pos[lo:hi]]
                got[m] = sel
            return [got[m] for m in models]

        return rows

    # -- the output folder ---------------------------------------------------------------------

    def update_config(self, config: dict) -> None:
        """Set the output ``config.json``'s vocabulary size to the rows written."""
        if self.size is None:
            return
        key = vocab_size_key(config)
        if len(key) == 1:
            config[key[0]] = self.size
        else:
            config[key[0]] = {**config[key[0]], key[1]: self.size}

    def save(self, write_file) -> list[str]:
        """Save the output tokenizer (``save_pretrained``) and hand each file of
        :data:`~mergeforge.checkpoint.CARRIED_FILES` it wrote to ``write_file(path, name)``;
        returns the names."""
        from mergeforge.checkpoint import CARRIED_FILES

        if self.tokenizer is None:
            return []
        names = []
        with tempfile.TemporaryDirectory(prefix="mergeforge-tokenizer-") as d:
            self.tokenizer.save_pretrained(d)
            for name in sorted(os.listdir(d)):
                if name in CARRIED_FILES and (Path(d) / name).is_file():
                    write_file(Path(d) / name, name)
                    names.append(name)
        return names


# ----------------------------------------------------------------------------------------------
# building it


@dataclass
class _Tokenizers:
    """The referenced models' tokenizers as the vocabulary merge reads them."""

    toks: dict[int, Any]
    """Model index -> its tokenizer (the base's without the tokens past its vocab_size)."""
    sizes: list[int | None]
    """Per model: the rows its config.json declares (``None``: not said)."""
    missing: list[int]


def _read_tokenizers(models: list[str], cks: list[Checkpoint], base: int, union: bool,
                     warnings: list[str]) -> _Tokenizers | None:  # fmt: skip
    toks: dict[int, Any] = {}
    missing = []
    for i, ck in enumerate(cks):
        if tokenizer_file(ck.folder) is None:
            missing.append(i)
            continue
        toks[i] = load_tokenizer(Path(ck.folder), models[i])
    sizes = [config_vocab_size(ck.config) for ck in cks]
    if union and missing:
        i = missing[0]
        where = f"its folder {cks[i].folder}" if cks[i].folder else "it is not a model folder"
        raise ValidationError(
            f"{models[i]}: no tokenizer (missing tokenizer.json; {where}), and 'union' builds "
            "the output vocabulary from every input's tokenizer. Copy the tokenizer files the "
            "model was trained with into its folder, or use 'tokenizer_source: base' if it "
            f"uses the base model's tokenizer. See {VOCAB_DOCS}."
        )
    if base in missing:
        if len(missing) == len(cks):
            return None
        raise ValidationError(
            f"{models[base]}: no tokenizer (missing tokenizer.json in "
            f"{cks[base].folder or 'an in-memory model'}), and the output vocabulary starts "
            "from the base model's (the first model's without a base). Copy its tokenizer "
            f"files into its folder. See {VOCAB_DOCS}."
        )
    for i in missing:
        warnings.append(
            f"{models[i]} has no tokenizer files: it is taken to use {models[base]}'s "
            "tokenizer (as mergekit does)."
        )
    vs = sizes[base] or len(toks[base].get_vocab())
    toks[base] = strip_tokenizer(toks[base], vs, models[base])
    return _Tokenizers(toks, sizes, missing)


def _union(models: list[str], t: _Tokenizers, base: int, warnings: list[str]) -> Any:
    """The base's tokenizer plus every other token of the inputs (module docstring)."""
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for i in [base, *(i for i in sorted(t.toks) if i != base)]:
        tok = t.toks[i]
        cutoff = t.sizes[i] or len(tok.get_vocab())
        special = {info.content for info in tok.added_tokens_decoder.values()}
        for token, k in sorted(tok.get_vocab().items(), key=lambda x: x[1]):
            if k < cutoff and token not in special:
                plain.setdefault(token)
        for k, info in sorted(tok.added_tokens_decoder.items()):
            if k >= cutoff:
                continue
            if info.content in added and added[info.content] != info:
                warnings.append(
                    f"token {info.content!r} is added with different settings by "
                    f"{models[i]} and an earlier model; the earlier model's are kept."
                )
            added.setdefault(info.content, info)
    out = copy_tokenizer(t.toks[base])
    base_vocab = t.toks[base].get_vocab()
    # one call each (as many one-token calls give, but in linear time: mergekit adds them
    # one by one, ~1 ms a token)
    out.add_tokens([t for t in plain if t not in added and t not in base_vocab])
    out.add_tokens(list(added.values()))
    return out


def _chat_template(value: str, models: list[str], cks: list[Checkpoint]) -> str | None:
    """``chat_template``'s text: ``auto`` = the template most inputs' tokenizers have (the
    first such in the config's order on a tie; ``None`` when none has one), a name of
    :data:`CHAT_TEMPLATES`, or the Jinja template itself."""
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    if value != "auto":
        return value
    found = []
    for i, ck in enumerate(cks):
        if tokenizer_file(ck.folder) is None:
            continue
        tpl = load_tokenizer(Path(ck.folder), models[i]).chat_template
        if isinstance(tpl, dict):
            tpl = tpl.get("default")
        if tpl:
            found.append(tpl.strip())
    return Counter(found).most_common(1)[0][0] if found else None


def plan_vocabulary(cfg: MergeConfig, models: list[str], cks: list[Checkpoint], reference: int,
                    warnings: list[str]) -> VocabPlan | None:  # fmt: skip
    """The vocabulary plan of a config with a tokenizer option or a ``chat_template`` (else
    ``None``), from the tokenizer files and config.json of ``cks`` (the opened ``models``,
    base first): the output tokenizer, each model's row map, the per-token sources. Raises
    naming the model, folder, file or token; appends to ``warnings``."""
    source = tokenizer_source(cfg)
    if source is None:
        if cfg.chat_template is None:
            return None
        ck = cks[reference]
        if tokenizer_file(ck.folder) is None:
            warnings.append(
                f"chat_template is not written: the reference model {models[reference]} has no "
                "tokenizer to write it into."
            )
            return None
        tok = load_tokenizer(Path(ck.folder), models[reference])
        plan = VocabPlan(tokenizer=tok, models=models)
        text = _chat_template(cfg.chat_template, models, cks)
        if text is not None:
            tok.chat_template = text
        return plan
    spec = cfg.tokenizer
    outside: Path | None = None
    base = _model_index(models, cfg.base_model) if cfg.base_model else 0
    assert base is not None
    t = _read_tokenizers(models, cks, base, source == "union", warnings)
    if t is None:
        if source == "base" and spec is None and cfg.chat_template is None:
            warnings.append(
                "tokenizer_source: base, but no input has tokenizer files: the base model's "
                "files are copied and the rows are merged by id."
            )
            return None
        raise ValidationError(
            f"no input has tokenizer files (looked in {', '.join(models)}), so there is no "
            f"vocabulary to build; copy each model's tokenizer files into its folder. See "
            f"{VOCAB_DOCS}."
        )
    if source == "union":
        out = _union(models, t, base, warnings)
    elif source == "base":
        out = copy_tokenizer(t.toks[base])
    else:
        i = _model_index(models, source)
        if i is not None:
            if i not in t.toks:
                raise ValidationError(
                    f"tokenizer_source: {source} has no tokenizer (missing tokenizer.json in "
                    f"{cks[i].folder}); copy its tokenizer files into its folder."
                )
            folder, name = Path(cks[i].folder), models[i]
        else:
            from mergeforge.checkpoint.loader import resolve_model_spec

            folder = Path(resolve_model_spec(source, cfg.root).split("+")[0])
            name = source
            outside = folder  # read, but not merged: an input all the same
        out = load_tokenizer(folder, name)
    tokens = dict(spec.tokens) if spec is not None else {}
    have = out.get_vocab()
    out.add_tokens([t for t in tokens if t not in have])
    vocab = out.get_vocab()
    n = len(vocab)
    if sorted(vocab.values()) != list(range(n)):
        raise ValidationError(
            f"the output tokenizer (from {source}) does not number its {n} tokens 0..{n - 1}; "
            "its tokenizer.json is inconsistent. Fix it, or choose another tokenizer_source."
        )
    size = n
    pad = spec.pad_to_multiple_of if spec is not None else None
    if pad and size % pad:
        size += pad - size % pad
    plan = VocabPlan(tokenizer=out, models=models, n_tokens=n, size=size, base=base,
                     source_folder=outside, source_name=source if outside else None)  # fmt: skip
    by_id = sorted(vocab, key=vocab.__getitem__)
    for i in range(len(cks)):
        mv = t.toks[i].get_vocab() if i in t.toks else t.toks[base].get_vocab()
        cutoff = t.sizes[i] or len(mv)
        mp = torch.full((n,), -1, dtype=torch.long)
        mp[:] = torch.tensor([k if (k := mv.get(tok, -1)) < cutoff else -1 for tok in by_id],
                             dtype=torch.long)  # fmt: skip
        plan.maps.append(mp)
    forced = []
    for token, setting in tokens.items():
        j = vocab[token]
        plan.token_names[j] = token
        resolved = _token_setting(token, setting, models, t, base)
        if resolved is not None:
            plan.settings[j] = resolved
        if setting.force:
            forced.append(j)
    plan.forced = torch.tensor(sorted(forced), dtype=torch.long)
    _name_missing_tokens(plan, by_id)
    if cfg.chat_template is not None:
        text = _chat_template(cfg.chat_template, models, cks)
        if text is not None:
            out.chat_template = text
    return plan


def _token_setting(token: str, setting: TokenSetting, models: list[str], t: _Tokenizers,
                   base: int) -> tuple[str, int | None, int | None] | None:  # fmt: skip
    src = setting.source
    if src is None:  # mergekit crashes on a token entry without a source; the default rule here
        return None
    if src.kind == "zero":
        return ("zero", None, None)
    assert src.model is not None
    m = _model_index(models, src.model)
    if m is None:
        raise ConfigError(
            f"tokenizer.tokens[{token!r}].source: {src.model} is not one of the merged models "
            f"({', '.join(models)}); the row comes from an input's tensor. See {VOCAB_DOCS}."
        )
    if src.kind == "model":
        return ("model", m, None)
    row = src.token_id
    if row is None:
        mv = (t.toks.get(m) or t.toks[base]).get_vocab()
        if src.token not in mv:
            raise ValidationError(
                f"tokenizer.tokens[{token!r}].source.token: {models[m]}'s tokenizer has no "
                f"token {src.token!r}."
            )
        row = mv[src.token]
    return ("model_token", m, row)


def _name_missing_tokens(plan: VocabPlan, by_id: list[str]) -> None:
    """Remember the strings of the tokens some model lacks (errors and warnings name them)."""
    lacking = torch.zeros(plan.n_tokens, dtype=torch.bool)
    for mp in plan.maps:
        if mp is not None:
            lacking |= mp < 0
    for j in lacking.nonzero().flatten().tolist():
        plan.token_names.setdefault(j, by_id[j])


# ----------------------------------------------------------------------------------------------
# without a tokenizer option


def _rows_of(ck: Checkpoint) -> dict[str, int] | None:
    """token -> id of a checkpoint's tokenizer.json, less the ids past its vocab_size (tokens
    the model has no row for)."""
    ids = read_token_ids(ck.folder)
    size = config_vocab_size(ck.config)
    if ids is None or size is None:
        return ids
    return {t: k for t, k in ids.items() if k < size}


def check_ids_agree(models: list[str], cks: list[Checkpoint], ref: int) -> list[str]:
    """Without a tokenizer option rows are merged by id, which is right only where the inputs'
    tokenizers (``tokenizer.json``, ids below each model's vocab_size) give each token the same
    id: refuse a token whose id differs, or an id two tokenizers give to different tokens,
    naming the token and both files; a token only one tokenizer has is a warning (its row is
    merged with the other models' rows of that id, which their tokenizers never produce).
    Returns the warnings."""
    ref_ids = _rows_of(cks[ref])
    if ref_ids is None:
        return []
    ref_tokens = {i: t for t, i in ref_ids.items()}
    ref_file = f"{cks[ref].folder}/tokenizer.json"
    fix = (
        "Set 'tokenizer_source: union' (or 'base') to realign the embedding rows by token, as "
        f"mergekit does; see {VOCAB_DOCS}."
    )
    warnings = []
    for i, ck in enumerate(cks):
        ids = _rows_of(ck) if i != ref else None
        if ids is None or ids == ref_ids:
            continue
        where = f"{ck.folder}/tokenizer.json"
        moved = sorted((k, t) for t, k in ids.items() if t in ref_ids and ref_ids[t] != k)
        if moved:
            k, token = moved[0]
            raise ValidationError(
                f"tokenizers differ: token {token!r} has id {k} in {where} but id "
                f"{ref_ids[token]} in {ref_file} ({len(moved)} token(s) have other ids); "
                f"merged by id, their embedding rows would not line up. {fix}"
            )
        extra = sorted((k, t) for t, k in ids.items() if t not in ref_ids)
        clash = [(k, t) for k, t in extra if k in ref_tokens]
        if clash:
            k, token = clash[0]
            raise ValidationError(
                f"tokenizers differ: id {k} is token {token!r} in {where} but "
                f"{ref_tokens[k]!r} in {ref_file}; merged by id, the rows of two different "
                f"tokens would be mixed. {fix}"
            )
        if extra:
            warnings.append(
                f"{models[i]}'s tokenizer has {len(extra)} token(s) that {models[ref]}'s lacks "
                f"(e.g. {', '.join(repr(t) for _, t in extra[:3])}); the output keeps "
                f"{models[ref]}'s tokenizer and merges those rows by id. " + fix
            )
    return warnings


# ----------------------------------------------------------------------------------------------
# the report of `mergeforge validate`


def report(cfg: MergeConfig, models: list[str], cks: list[Checkpoint]) -> list[str]:
    """How the inputs' vocabularies differ, for ``mergeforge validate``: per model its vocab_size,
    tokenizer size, added tokens, tokens shared with the output vocabulary, tokens the
    reference (the base, else the first model) lacks and tokens whose id differs from the
    reference's; then what the output vocabulary is and how its rows are filled. Empty when no
    model has a tokenizer.json, or when all have the same one and no tokenizer option is
    given."""
    base = (_model_index(models, cfg.base_model) if cfg.base_model else 0) or 0
    source = tokenizer_source(cfg)
    vocabs: list[dict[str, int] | None] = []
    added: list[int | None] = []
    plan = None
    if source is not None:
        plan = plan_vocabulary(cfg, models, cks, base, [])
    for i, ck in enumerate(cks):
        if tokenizer_file(ck.folder) is not None:
            tok = load_tokenizer(Path(ck.folder), models[i])
            vocabs.append(tok.get_vocab())
            added.append(len(tok.added_tokens_decoder))
        else:
            vocabs.append(None)
            added.append(None)
    if all(v is None for v in vocabs):
        return []
    if source is None and all(v is None or v == vocabs[base] for v in vocabs):
        return [f"vocabularies: the inputs share one tokenizer ({len(vocabs[base] or {})} tokens)"]
    if source is None:
        out_vocab = vocabs[base] or {}
    elif plan is not None and plan.tokenizer is not None:
        out_vocab = plan.tokenizer.get_vocab()
    else:
        out_vocab = vocabs[base] or {}
    ref_vocab = vocabs[base] or {}
    head = ("model", "vocab_size", "tokens", "added", "shared", "new", "moved")
    rows = [head]
    for i, v in enumerate(vocabs):
        size = config_vocab_size(cks[i].config)
        if v is None:
            rows.append((models[i], str(size or "?"), "-", "-", "-", "-", "-"))
            continue
        shared = sum(1 for t in v if t in out_vocab)
        new = sum(1 for t in v if t not in ref_vocab)
        moved = [t for t, k in v.items() if t in ref_vocab and ref_vocab[t] != k]
        rows.append((models[i], str(size or "?"), str(len(v)),
                     "-" if added[i] is None else str(added[i]), str(shared), str(new),
                     str(len(moved))))  # fmt: skip
    widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
    lines = ["vocabularies (tokens: the tokenizer's; added: its added/special tokens; shared: "
             "also in the output vocabulary; new: not in the reference's; moved: at another id "
             f"than in the reference {models[base]}):"]  # fmt: skip
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    for i, v in enumerate(vocabs):
        if v is None or i == base:
            continue
        moved = sorted((k, t) for t, k in v.items() if t in ref_vocab and ref_vocab[t] != k)
        if moved:
            eg = ", ".join(f"{t!r} {ref_vocab[t]}->{k}" for k, t in moved[:3])
            lines.append(f"  {models[i]}: e.g. {eg}")
    if source is None:
        lines.append(
            "output vocabulary: the reference's tokenizer; rows merged by id (no tokenizer "
            "option). Set 'tokenizer_source: union' to realign rows by token."
        )
    elif plan is not None and plan.size is not None:
        lines.append(_fill_summary(plan, source))
        lines += [f"  {s}" for s in plan.summary]
    return lines


def _fill_summary(plan: VocabPlan, source: str) -> str:
    maps = torch.stack([m for m in plan.maps if m is not None])
    count = (maps >= 0).sum(0)
    k = maps.shape[0]
    forced = 0 if plan.forced is None else plan.forced.numel()
    pad = f", padded to {plan.size} rows" if plan.size != plan.n_tokens else ""
    return (
        f"output vocabulary ({source}): {plan.n_tokens} tokens{pad}; in every model "
        f"{int((count == k).sum())}, in some but not all {int(((count > 0) & (count < k)).sum())}"
        f" (in one only {int((count == 1).sum()) if k > 1 else 0}), in none "
        f"{int((count == 0).sum())}; forced by tokenizer.tokens {forced}. A model lacking a "
        "token gets its fill row (README, 'Vocabularies')."
    )
