"""The two output layouts, their choice, and the output's tensors and ``config.json``.

mergekit 0.1.5 (``mergekit/moe/mixtral.py``, ``qwen.py``, ``scripts/moe.py``; ALGORITHMS.md §6.1):

* **Mixtral** (``MixtralForCausalLM``) from llama / mistral experts, no shared expert. Per layer
  ``mlp.gate.weight`` (E, H) and, in the fused layout of transformers v5 that mergekit writes,
  ``mlp.experts.gate_up_proj`` (E, 2I, H) = expert e's ``gate_proj`` rows then its ``up_proj``
  rows, and ``mlp.experts.down_proj`` (E, H, I).
* **Qwen2-MoE** (``Qwen2MoeForCausalLM``) from llama / mistral / qwen2 experts with a shared
  expert, written per expert as mergekit does (``mlp.experts.{e}.{gate,up,down}_proj.weight``;
  transformers fuses them when it loads), plus ``mlp.shared_expert.*`` and
  ``mlp.shared_expert_gate.weight`` (1, H). Attention q/k/v biases (Qwen2-MoE has them) are the
  base's, or zeros for a llama / mistral base. Beyond mergekit (one shared expert only): several
  shared experts are held as one wider shared expert (their MLPs side by side on the
  intermediate axis, so its output is the sum of theirs; each ``down_proj`` is scaled by 1/S so
  the sum is their mean), gated by the mean of their gate rows.

Everything else (embeddings, attention, norms, head) is the base model's. A base that stores no
``lm_head.weight`` keeps ``tie_word_embeddings`` (the output stores none either, as mergekit);
one whose config says untied but stores no head gets ``lm_head.weight`` = its embeddings (what
the engine does for tied inputs, ``engine/layout.py``), where mergekit would leave it random.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from mergeforge.errors import ConfigError, ValidationError, not_implemented
from mergeforge.moe.config import RANDOM_MODES, MoEConfig

MERGEKIT_ARCHITECTURES = ("Mixtral", "DeepSeek MoE", "Qwen MoE", "Qwen3 MoE")
"""mergekit's output architectures, in its order of preference (Mixtral first)."""
PROJ = ("gate_proj", "up_proj", "down_proj")
EMBED, HEAD, NORM = "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"
MOE_DOCS = 'the README\'s "Mixture of experts from dense experts"'
MIN_TRANSFORMERS = 5
"""The transformers major version the output needs: v5's fused Mixtral experts
(``mlp.experts.gate_up_proj``, ``down_proj``), which transformers 4.x cannot load, and the
``dtype=`` keyword of ``from_config`` / ``from_pretrained`` (4.x: ``torch_dtype=``)."""


def check_transformers() -> None:
    """Refuse (before any work) an installed transformers older than :data:`MIN_TRANSFORMERS`
    with the pin to install; nothing to check when it is not installed (the prompt gates and
    the routing report then fail on importing it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("transformers")
    except PackageNotFoundError:
        return
    major = found.split(".")[0]
    if major.isdigit() and int(major) < MIN_TRANSFORMERS:
        raise ConfigError(
            f"mergeforge moe writes transformers v{MIN_TRANSFORMERS}'s MoE layout (Mixtral's "
            f"fused mlp.experts.gate_up_proj) and loads models with its dtype= keyword; "
            f"transformers {found} is installed, which cannot load that layout. Upgrade: "
            f"pip install 'transformers>={MIN_TRANSFORMERS}'"
        )


@dataclass(frozen=True)
class Layout:
    name: str
    """mergekit's name: ``Mixtral`` or ``Qwen MoE``."""
    model_type: str
    architecture: str
    inputs: tuple[str, ...]
    """The ``model_type`` values of the dense models it takes."""


MIXTRAL = Layout("Mixtral", "mixtral", "MixtralForCausalLM", ("llama", "mistral"))
QWEN2_MOE = Layout("Qwen MoE", "qwen2_moe", "Qwen2MoeForCausalLM", ("llama", "mistral", "qwen2"))


def _why_not(name: str, cfg: MoEConfig, mtype: str) -> str | None:
    """Why mergekit's architecture ``name`` cannot take ``cfg`` (None: it can)."""
    s = len(cfg.shared_experts)
    shared_prompts = any(e.positive_prompts or e.negative_prompts for e in cfg.shared_experts)
    if name == "Mixtral":
        if s:
            return "Mixtral has no shared expert"
        return None if mtype in MIXTRAL.inputs else "Mixtral takes llama or mistral models"
    if name == "DeepSeek MoE":
        if s > 1 or shared_prompts:
            return "DeepSeek MoE takes at most one shared expert, without prompts"
        return None if mtype in ("llama", "mistral") else "DeepSeek MoE takes llama or mistral"
    if name == "Qwen MoE":
        if not s:
            return "Qwen2-MoE needs a shared expert (shared_experts:)"
        if cfg.gate_mode not in RANDOM_MODES and not shared_prompts:
            return "Qwen2-MoE gates its shared expert from the shared expert's prompts"
        return None if mtype in QWEN2_MOE.inputs else "Qwen2-MoE takes llama, mistral or qwen2"
    if s:
        return "Qwen3-MoE has no shared expert"
    return None if mtype == "qwen3" else "Qwen3-MoE takes qwen3 models"


def select_layout(cfg: MoEConfig, model_type: str) -> Layout:
    """mergekit's choice (``select_output_arch``): the architectures whose name starts with
    ``architecture`` (all when unset) that can take the config, Mixtral first, else the first
    of them. DeepSeek-MoE (remote code) and Qwen3-MoE are not written by mergeforge yet."""
    prefix = (cfg.architecture or "").lower()
    named = [a for a in MERGEKIT_ARCHITECTURES if a.lower().startswith(prefix)]
    if not named:
        raise ConfigError(
            f"config: architecture: {cfg.architecture!r} names no MoE architecture; use a "
            "prefix of mixtral or qwen (mergekit also has qwen3, deepseek)"
        )
    why = {a: _why_not(a, cfg, model_type) for a in named}
    fits = [a for a in named if why[a] is None]
    if not fits:
        reasons = "; ".join(f"{a}: {why[a]}" for a in named)
        raise ValidationError(
            f"no MoE architecture fits these {model_type!r} models and this config ({reasons}). "
            "Llama/Mistral experts without shared experts give Mixtral; with one shared expert "
            "that has prompts, Qwen2-MoE."
        )
    chosen = "Mixtral" if "Mixtral" in fits else fits[0]
    if chosen == "Mixtral":
        return MIXTRAL
    if chosen == "Qwen MoE":
        return QWEN2_MOE
    closest = ("architecture: qwen, with prompts for the shared expert" if chosen == "DeepSeek MoE"
               else "Mixtral / Qwen2-MoE from llama, mistral or qwen2 experts")  # fmt: skip
    raise not_implemented(f"the {chosen} output architecture", closest, MOE_DOCS)


@dataclass(frozen=True)
class Job:
    """One output tensor: its name, shape, dtype and how it is made (``assemble.py``).

    ``kind``: ``copy`` (``src`` of the base), ``zeros``, ``gate`` (rows ``rows`` of the layer's
    gate matrix), ``shared_gate`` (the mean of rows ``rows``), ``fused_gate_up`` /
    ``fused_down`` (every expert's MLP of ``layer``, stacked: Mixtral), ``expert`` (``proj`` of
    expert ``rows[0]``: Qwen2-MoE), ``shared`` (``proj`` of the shared experts ``rows``, side by
    side)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str
    src: str = ""
    layer: int = -1
    proj: str = ""
    rows: tuple[int, ...] = ()


def mlp_name(layer: int, proj: str) -> str:
    """A dense llama / mistral / qwen2 MLP weight."""
    return f"model.layers.{layer}.mlp.{proj}.weight"


def attention_names(layer: int) -> list[str]:
    p = f"model.layers.{layer}."
    return [p + "input_layernorm.weight",
            *(f"{p}self_attn.{x}_proj.weight" for x in "qkvo"),
            p + "post_attention_layernorm.weight"]  # fmt: skip


def plan_tensors(
    layout: Layout, base: dict[str, tuple[tuple[int, ...], torch.dtype]], *, layers: int,
    hidden: int, intermediate: int, n_experts: int, n_shared: int, dtype: torch.dtype,
    tied: bool, heads: tuple[int, int, int],
) -> list[Job]:  # fmt: skip
    """Every output tensor, in the order they are written (layer by layer). ``base``: the base
    model's tensor name -> (shape, dtype); ``heads``: (attention heads, key-value heads, head
    dim), for the zero q/k/v biases of Qwen2-MoE over a llama / mistral base."""

    def copy(name: str) -> Job:
        return Job(name, base[name][0], dtype, "copy", src=name)

    E, S, H, inter = n_experts, n_shared, hidden, intermediate
    jobs = [copy(EMBED)]
    for i in range(layers):
        jobs += [copy(n) for n in attention_names(i)]
        if layout is QWEN2_MOE:
            n_heads, n_kv, head_dim = heads
            for x, width in (("q", n_heads), ("k", n_kv), ("v", n_kv)):
                name = f"model.layers.{i}.self_attn.{x}_proj.bias"
                jobs.append(copy(name) if name in base
                            else Job(name, (width * head_dim,), dtype, "zeros"))  # fmt: skip
        p = f"model.layers.{i}.mlp."
        jobs.append(Job(p + "gate.weight", (E, H), dtype, "gate", layer=i, rows=tuple(range(E))))
        if layout is MIXTRAL:
            jobs.append(Job(p + "experts.gate_up_proj", (E, 2 * inter, H), dtype, "fused_gate_up",
                            layer=i))  # fmt: skip
            jobs.append(Job(p + "experts.down_proj", (E, H, inter), dtype, "fused_down", layer=i))
            continue
        for e in range(E):
            for proj in PROJ:
                shape = (H, inter) if proj == "down_proj" else (inter, H)
                jobs.append(Job(f"{p}experts.{e}.{proj}.weight", shape, dtype, "expert",
                                layer=i, proj=proj, rows=(e,)))  # fmt: skip
        shared = tuple(range(E, E + S))
        for proj in PROJ:
            shape = (H, S * inter) if proj == "down_proj" else (S * inter, H)
            jobs.append(Job(f"{p}shared_expert.{proj}.weight", shape, dtype, "shared", layer=i,
                            proj=proj, rows=shared))  # fmt: skip
        jobs.append(Job(p + "shared_expert_gate.weight", (1, H), dtype, "shared_gate", layer=i,
                        rows=shared))  # fmt: skip
    jobs.append(copy(NORM))
    if HEAD in base:
        jobs.append(copy(HEAD))
    elif not tied:  # untied config, no head stored: the embeddings are the head it was used with
        jobs.append(Job(HEAD, base[EMBED][0], dtype, "copy", src=EMBED))
    return jobs


def output_config(
    layout: Layout, base_config: dict[str, Any], *, n_experts: int, n_shared: int,
    experts_per_token: int, dtype: torch.dtype,
) -> dict[str, Any]:  # fmt: skip
    """``config.json`` of the output: the base's settings in the MoE config class of
    ``transformers`` (as mergekit's ``_generate_config``), with the expert counts."""
    import transformers as tf

    skip = {"architectures", "model_type", "transformers_version", "auto_map", "_name_or_path"}
    d = {k: v for k, v in base_config.items() if k not in skip}
    if layout is MIXTRAL:
        cfg = tf.MixtralConfig(**d)
        cfg.num_local_experts = n_experts
    else:
        cfg = tf.Qwen2MoeConfig(**d)
        cfg.num_experts = n_experts
        cfg.decoder_sparse_step = 1
        cfg.norm_topk_prob = True
        cfg.use_sliding_window = False
        cfg.moe_intermediate_size = cfg.intermediate_size
        cfg.shared_expert_intermediate_size = cfg.intermediate_size * n_shared
    cfg.architectures = [layout.architecture]
    cfg.num_experts_per_tok = experts_per_token
    cfg.sliding_window = None
    cfg.dtype = dtype
    return json.loads(cfg.to_json_string())  # what save_pretrained writes
