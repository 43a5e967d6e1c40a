"""The base model's forward pass for the prompt gates, without ``transformers``' modelling code.

The gates of the ``hidden`` and ``router_input`` modes need a Llama base model's hidden states.
Building it as ``transformers``' ``LlamaForCausalLM`` costs more than running it: importing the
modelling code (``modeling_llama`` and ``configuration_llama``, which pull in
``torch.distributed.tensor`` and sympy) takes ~2.2 CPU s, and the model converts every weight
to the gate dtype, embeddings, head and last layer included, which the gates never use.

For the configurations :func:`supported` accepts (``model_type: llama``, default RoPE, SiLU,
no biases), :class:`LlamaForward` runs the operations of ``transformers`` 5's ``LlamaModel``
in its default ``sdpa`` attention, in the same order, dtypes and shapes: embedding rows cast
to the gate dtype, RMSNorm in float32 then cast, RoPE tables in float32 then cast, q / k / v
projections, ``scaled_dot_product_attention`` with ``is_causal`` when no token is padded and
the boolean causal-and-padding mask otherwise (``masking_utils.sdpa_mask``), GQA by
``enable_gqa`` without a mask and by repeated k / v heads with one (``sdpa_attention_forward``),
the SiLU MLP, the residual adds. Its hidden states are transformers' bit for bit
(``tests/moe/test_gates.py`` compares them). Every other base (Mistral, Qwen2, RoPE scaling,
...) runs in ``transformers``' own model (``gates.load_base_model``).

Only the weights the gates read are converted: the residual entering layer i needs layers
0..i-1, so the last layer, the final norm and the head are never loaded; the embedding rows of
the prompts' tokens are cast as they are looked up.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from mergeforge.checkpoint import Checkpoint
from mergeforge.errors import ValidationError

EMBED = "model.embed_tokens.weight"
DEFAULT_THETA = 10_000.0  # LlamaConfig's (RotaryEmbeddingConfigMixin.default_theta)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def _int(cfg: Mapping[str, Any], key: str) -> bool:
    v = cfg.get(key)
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _rope(cfg: Mapping[str, Any]) -> float | None:
    """The RoPE base of a config with plain (unscaled, full-width) RoPE, else ``None``; read
    as ``RotaryEmbeddingConfigMixin.convert_rope_params_to_dict`` does (``rope_scaling``
    first, then ``rope_parameters``; ``rope_theta`` inside it, beside it, or 10000)."""
    params = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(params, Mapping) or set(params) - {"rope_type", "type", "rope_theta"}:
        return None
    if params.get("rope_type", params.get("type", "default")) != "default":
        return None
    if cfg.get("partial_rotary_factor") is not None:
        return None
    theta = params.get("rope_theta", cfg.get("rope_theta", DEFAULT_THETA))
    if theta is None:
        theta = DEFAULT_THETA
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        return None
    return float(theta)


def supported(cfg: Mapping[str, Any]) -> bool:
    """Whether :class:`LlamaForward` computes what ``transformers``' model of this
    ``config.json`` computes: a Llama with SiLU, default RoPE, no attention / MLP bias, no
    other attention implementation asked for, sizes that LlamaConfig accepts."""
    if cfg.get("model_type") != "llama" or cfg.get("hidden_act", "silu") != "silu":
        return False
    if cfg.get("attention_bias") or cfg.get("mlp_bias") or cfg.get("is_causal", True) is not True:
        return False
    if cfg.get("pretraining_tp", 1) not in (None, 1):
        return False
    if cfg.get("attn_implementation", cfg.get("_attn_implementation")) not in (None, "sdpa"):
        return False
    if not all(_int(cfg, k) for k in ("hidden_size", "num_attention_heads", "num_hidden_layers")):
        return False
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    if hidden % heads or not isinstance(kv, int) or heads % kv or not isinstance(head_dim, int):
        return False
    if head_dim % 2:
        return False
    eps = cfg.get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        return False
    return _rope(cfg) is not None


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm.forward``."""
    dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    batch, kv, slen, head_dim = x.shape
    if n_rep == 1:
        return x
    x = x[:, :, None, :, :].expand(batch, kv, n_rep, slen, head_dim)
    return x.reshape(batch, kv * n_rep, slen, head_dim)


class LlamaForward:
    """The base model of ``config`` (a ``config.json`` that :func:`supported` accepts) in
    ``dtype`` on ``device``, its weights read from ``base``: :meth:`residuals` (the residual
    stream entering each layer) or :meth:`mlp_inputs` (each layer's MLP input, what a MoE
    router reads). ``mlp_inputs``: load what :meth:`mlp_inputs` needs (every layer's attention;
    no MLP of the last layer), else what :meth:`residuals` needs (layers 0..L-2)."""

    def __init__(self, base: Checkpoint, cfg: Mapping[str, Any], dtype: torch.dtype,
                 device: torch.device, *, mlp_inputs: bool = False):  # fmt: skip
        self.dtype, self.device = dtype, device
        self.layers_total = cfg["num_hidden_layers"]
        self.heads = cfg["num_attention_heads"]
        self.kv_heads = cfg.get("num_key_value_heads") or self.heads
        self.head_dim = cfg.get("head_dim") or cfg["hidden_size"] // self.heads
        self.groups = self.heads // self.kv_heads
        self.scaling = self.head_dim**-0.5
        self.eps = cfg.get("rms_norm_eps", 1e-6)
        theta = _rope(cfg)
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float)
                                         / self.head_dim))  # fmt: skip
        self.inv_freq = self.inv_freq.to(device)
        stored = set(base.keys())

        def get(name: str) -> torch.Tensor:
            if name not in stored:
                raise ValidationError(
                    f"{base.path}: the base model stores no {name!r}, which its config.json "
                    f"({cfg.get('model_type')}) needs to run the prompts; check the base model"
                )
            return base.get(name).to(dtype).to(device)

        if EMBED not in stored:
            get(EMBED)
        self.embed = base.get(EMBED)  # rows are cast when looked up
        n = self.layers_total if mlp_inputs else self.layers_total - 1
        self.layers: list[dict[str, torch.Tensor]] = []
        for i in range(max(n, 0)):
            p = f"model.layers.{i}."
            w = {n: get(f"{p}{n}.weight") for n in ("input_layernorm", "post_attention_layernorm")}
            w.update({x: get(f"{p}self_attn.{x}.weight") for x in ATTENTION})
            if not (mlp_inputs and i == self.layers_total - 1):
                w.update({x: get(f"{p}mlp.{x}.weight") for x in MLP})
            self.layers.append(w)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``nn.Embedding`` over the weight cast to ``dtype``: the same numbers, casting only
        the rows looked up."""
        rows = self.embed[input_ids.reshape(-1).cpu()].to(self.dtype)
        return rows.reshape(*input_ids.shape, -1).to(self.device)

    def _rope(self, x: torch.Tensor, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``LlamaRotaryEmbedding.forward`` at positions 0..seq-1 (attention scaling 1)."""
        position_ids = torch.arange(seq, device=x.device).unsqueeze(0)
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device,
                                                                   dtype=torch.float)  # fmt: skip
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * 1.0
        sin = emb.sin() * 1.0
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)

    @staticmethod
    def _mask(attention_mask: torch.Tensor, seq: int) -> torch.Tensor | None:
        """``masking_utils.sdpa_mask`` for a prefill without cache: ``None`` (sdpa's
        ``is_causal``) when no token is padded, else (B, 1, T, T) bool = causal and the key is
        not a pad."""
        pad = attention_mask.to(torch.bool)
        if bool(pad.all()):
            return None
        q = torch.arange(seq, device=pad.device)
        causal = q[None, :] <= q[:, None]  # kv_idx <= q_idx
        mask = causal[None, None, :, :] & pad[:, None, None, :]
        return mask.expand(pad.shape[0], -1, seq, seq)

    def _attention(self, w: dict, h: torch.Tensor, cos, sin, mask) -> torch.Tensor:
        """``LlamaAttention.forward`` with ``sdpa_attention_forward``."""
        input_shape = h.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = F.linear(h, w["q_proj"]).view(hidden_shape).transpose(1, 2)
        k = F.linear(h, w["k_proj"]).view(hidden_shape).transpose(1, 2)
        v = F.linear(h, w["v_proj"]).view(hidden_shape).transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        q = (q * c) + (_rotate_half(q) * s)
        k = (k * c) + (_rotate_half(k) * s)
        q_length = q.shape[2]
        kwargs = {}
        if self.groups > 1:
            if mask is None and k.shape[-1] == v.shape[-1] <= 256:
                kwargs["enable_gqa"] = True
            elif q_length == 1:
                q = q.reshape(q.shape[0], self.heads // self.groups, self.groups, q.shape[-1])
            else:
                k, v = _repeat_kv(k, self.groups), _repeat_kv(v, self.groups)
        is_causal = q_length > 1 and mask is None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0,
                                             scale=self.scaling, is_causal=is_causal,
                                             **kwargs)  # fmt: skip
        out = out.reshape(out.shape[0], -1, q_length, v.shape[-1])
        out = out.transpose(1, 2).contiguous()
        out = out.reshape(*input_shape, -1).contiguous()
        return F.linear(out, w["o_proj"])

    def _run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
             mlp_inputs: bool) -> list[torch.Tensor]:  # fmt: skip
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        x = self._embed(input_ids)
        seq = x.shape[1]
        cos, sin = self._rope(x, seq)
        mask = self._mask(attention_mask, seq)
        out = [] if mlp_inputs else [x]
        for i, w in enumerate(self.layers):
            residual = x
            h = _rms(x, w["input_layernorm"], self.eps)
            x = residual + self._attention(w, h, cos, sin, mask)
            residual = x
            h = _rms(x, w["post_attention_layernorm"], self.eps)
            if mlp_inputs:
                out.append(h)
                if i == self.layers_total - 1:
                    break
            h = F.linear(F.silu(F.linear(h, w["gate_proj"])) * F.linear(h, w["up_proj"]),
                         w["down_proj"])  # fmt: skip
            x = residual + h
            if not mlp_inputs:
                out.append(x)
        return out[: self.layers_total]

    @torch.no_grad()
    def residuals(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list:
        """The residual stream entering layer i, i = 0..L-1: ``hidden_states[:-1]`` of
        ``transformers``' forward (L tensors (B, T, H))."""
        return self._run(input_ids, attention_mask, mlp_inputs=False)

    @torch.no_grad()
    def mlp_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list:
        """Layer i's MLP input ``post_attention_layernorm(h + attention(h))``, i = 0..L-1."""
        return self._run(input_ids, attention_mask, mlp_inputs=True)
