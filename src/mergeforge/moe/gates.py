"""Gate (router) rows from prompts: mergekit-moe's five modes and mergeforge's two.

mergekit 0.1.5 (``mergekit/moe/router.py``, ALGORITHMS.md §6.1). The result is a tensor
(layers L, gated experts N, hidden H) in float32: rows 0..E-1 are the experts, E.. the shared
experts; the router of layer i is ``gates[i, :E]`` (no scale, no bias). The base model runs as
``transformers``' ``AutoModelForCausalLM``, or, for a plain Llama, as ``forward.LlamaForward``
(the same operations without transformers' modelling code; hidden states equal bit for bit).

* ``hidden`` / ``hidden_avg``: the base model (``gate_dtype``, bfloat16 as mergekit) runs each
  expert's prompts as one batch, each prompt prefixed with BOS, left-padded with BOS; for layer
  i it takes ``hidden_states[i]``, the residual stream *entering* layer i, at the last position
  (``hidden``) or averaged over every position, pads included (``hidden_avg``), then the mean
  over the prompts. Gate = unit vector of (positive mean - negative mean). Unlike mergekit, the
  reductions run in float32 on the bfloat16 states, so the rows equal mergekit's to bfloat16
  rounding, not bit for bit.
* ``cheap_embed``: the unit vector of the sum of the prompts' token embeddings (pads masked;
  the same for every layer); with negative prompts, the unit vector of the difference of the
  two unit vectors. Bit-identical to mergekit (the same float32 sums, in the same order).
* ``random``: N(0, 1); ``uniform_random``: U(-1/sqrt(H), 1/sqrt(H)) (``torch.nn.Linear``'s
  init). Drawn as one (L, N, H) tensor from a generator seeded with ``seed``: the same numbers
  as mergekit run with ``--random-seed SEED``.
* mergeforge: ``router_input`` / ``router_input_avg``: what the router of a Mixtral / Qwen2-MoE
  layer really receives is not the residual stream but the MLP's input,
  ``post_attention_layernorm(h + attention(h))``. These modes record that input (a hook on
  each layer's MLP) at the last token or averaged over the prompt's own tokens; each prompt runs
  alone, so no padding shifts positions or enters the mean. Then as ``hidden``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from mergeforge.checkpoint import Checkpoint
from mergeforge.errors import CheckpointError, ValidationError
from mergeforge.moe import forward
from mergeforge.moe.config import Expert, MoEConfig

EMBED = "model.embed_tokens.weight"


def unit(v: torch.Tensor) -> torch.Tensor:
    """``v`` / its L2 norm over the last axis (norm clamped at 1e-8, as mergekit)."""
    return v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


def random_gates(mode: str, shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """(L, N, H) from ``torch.Generator().manual_seed(seed)``: N(0, 1) for ``random``,
    U(-1/sqrt(H), 1/sqrt(H)) for ``uniform_random`` (the same arithmetic as mergekit)."""
    g = torch.Generator().manual_seed(seed)
    if mode == "random":
        return torch.randn(shape, generator=g)
    scale = math.sqrt(1.0 / shape[-1])
    return torch.rand(shape, generator=g) * 2 * scale - scale


def load_tokenizer(base: Checkpoint):
    """The base model's tokenizer, left-padding with BOS (EOS when it has none), as mergekit.
    A ``tokenizer.json`` declared as the generic fast class loads as that class directly,
    which is what ``AutoTokenizer`` loads too, without importing the model's config class
    first (``checkpoint.tokenizer._generic_backend``: ~1 CPU s)."""
    import transformers as tf

    from mergeforge.checkpoint.tokenizer import _generic_backend

    try:
        generic = _generic_backend(Path(base.folder)) if base.folder is not None else None
        if generic is not None:
            tok = generic.from_pretrained(str(base.folder))
        else:
            tok = tf.AutoTokenizer.from_pretrained(str(base.folder))
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{base.folder}: the base model's tokenizer cannot be loaded ({e}); prompt gate "
            "modes tokenize the prompts with it: add the tokenizer files, or use gate_mode: "
            "random"
        ) from None
    tok.padding_side = "left"
    tok.pad_token_id = tok.bos_token_id
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _batch(tok, prompts: Sequence[str]):
    """The prompts as mergekit tokenizes them: BOS + prompt, no other special token, padded."""
    return tok([(tok.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
               add_special_tokens=False)  # fmt: skip


def load_base_model(base: Checkpoint, dtype: torch.dtype, device: torch.device):
    """The base model as a ``transformers`` causal LM in ``dtype`` (for its hidden states), its
    weights read through the checkpoint (so every input form ``merge`` reads works: folders,
    Hub ids, ``BASE+ADAPTER``). A head it does not store is left as is (it is not used)."""
    import transformers as tf

    config = tf.AutoConfig.from_pretrained(str(base.folder))
    with _no_init():  # every weight is overwritten below: skip the random initialisation
        model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    stored = set(base.keys())
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name in stored:
                t.copy_(base.get(name))
            elif name != "lm_head.weight":  # an unstored head (maybe tied: shares the
                # embedding's storage, so it is left alone) is not used for hidden states
                raise ValidationError(
                    f"{base.path}: the base model stores no {name!r}, which its config.json "
                    f"({config.model_type}) needs to run the prompts; check the base model"
                )
    return model.eval().to(device)


def _no_init():
    """transformers' context that skips weight initialisation (torch's init functions and
    ``init_weights``; buffers such as rotary frequencies are still computed): on a 250M model
    the random initialisation that the checkpoint's tensors then overwrite cost 2 CPU s."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # an older or newer layout: initialise (slower, same result)
        import contextlib

        return contextlib.nullcontext()
    return no_init_weights()


def load_gate_model(cfg: MoEConfig, base: Checkpoint, device: torch.device):
    """The model the prompt modes run (``None`` for the random modes and ``cheap_embed``): a
    Llama base as :class:`~mergeforge.moe.forward.LlamaForward` (transformers' forward, op
    for op, without its modelling code), any other as ``transformers``' model. Reads and
    converts the base's weights, which takes no GIL: ``build_moe`` runs it on its own thread."""
    if cfg.gate_mode in ("random", "uniform_random", "cheap_embed"):
        return None
    dtype = getattr(torch, cfg.gate_dtype)
    if base.config is not None and forward.supported(base.config):
        router = cfg.gate_mode.startswith("router_input")
        return forward.LlamaForward(base, base.config, dtype, device, mlp_inputs=router)
    return load_base_model(base, dtype, device)


class _Runner:
    """One prompt set -> (L, H) float32 for one of the prompt modes; ``model``: what
    :func:`load_gate_model` returns (loaded here when not given)."""

    def __init__(self, cfg: MoEConfig, base: Checkpoint, layers: int, device: torch.device,
                 model=None):  # fmt: skip
        self.mode, self.layers, self.device = cfg.gate_mode, layers, device
        self.tok = load_tokenizer(base)
        self.native = None
        if self.mode == "cheap_embed":
            self.embed = base.get(EMBED).float()
            return
        model = model if model is not None else load_gate_model(cfg, base, device)
        if isinstance(model, forward.LlamaForward):
            self.native = model
        else:
            self.model = model

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        if self.mode == "cheap_embed":
            enc = _batch(self.tok, prompts)
            h = self.embed[enc["input_ids"]] * enc["attention_mask"].unsqueeze(-1)
            return unit(h.sum(dim=1).sum(dim=0, keepdim=True)).repeat(self.layers, 1)
        if self.mode in ("hidden", "hidden_avg"):
            return self._residual(prompts)
        return self._router_input(prompts)

    @torch.no_grad()
    def _residual(self, prompts: Sequence[str]) -> torch.Tensor:
        enc = _batch(self.tok, prompts).to(self.device)
        if self.native is not None:
            states = self.native.residuals(enc["input_ids"], enc["attention_mask"])
        else:
            states = self.model(**enc, output_hidden_states=True, return_dict=True).hidden_states
            states = states[:-1]
        hs = torch.stack(states).float().cpu()  # (L, B, T, H): entering layer i
        hs = hs.mean(dim=2) if self.mode == "hidden_avg" else hs[:, :, -1]
        return hs.mean(dim=1)

    @torch.no_grad()
    def _router_input(self, prompts: Sequence[str]) -> torch.Tensor:
        if self.native is not None:
            rows = []
            for p in prompts:  # one at a time: no padding
                enc = _batch(self.tok, [p])
                seen = self.native.mlp_inputs(enc["input_ids"], enc["attention_mask"])
                h = torch.stack([x[0] for x in seen]).float().cpu()
                rows.append(h.mean(dim=1) if self.mode == "router_input_avg" else h[:, -1])
            return torch.stack(rows).mean(dim=0)
        seen: dict[int, torch.Tensor] = {}
        mlps = [self.model.model.layers[i].mlp for i in range(self.layers)]
        hooks = [m.register_forward_pre_hook(lambda _m, a, i=i: seen.__setitem__(i, a[0]))
                 for i, m in enumerate(mlps)]  # fmt: skip
        try:
            rows = []
            for p in prompts:  # one at a time: no padding
                enc = _batch(self.tok, [p]).to(self.device)
                self.model.model(**enc)
                h = torch.stack([seen[i][0] for i in range(self.layers)]).float().cpu()
                rows.append(h.mean(dim=1) if self.mode == "router_input_avg" else h[:, -1])
            return torch.stack(rows).mean(dim=0)
        finally:
            for h in hooks:
                h.remove()


def prompt_gates(
    cfg: MoEConfig,
    experts: Sequence[Expert],
    base: Checkpoint,
    layers: int,
    device: torch.device,
    model=None,
) -> torch.Tensor:
    """(L, N, H) for the prompt modes: per expert, unit(f(positive) - f(negative)); ``model``:
    :func:`load_gate_model`'s, when already loaded."""
    run = _Runner(cfg, base, layers, device, model)
    rows = []
    for e in experts:
        v = run(e.positive_prompts)
        if e.negative_prompts:
            v = v - run(e.negative_prompts)
        rows.append(unit(v))
    return torch.stack(rows, dim=1)


def compute_gates(
    cfg: MoEConfig,
    base: Checkpoint,
    *,
    layers: int,
    hidden: int,
    device: torch.device,
    model=None,
) -> torch.Tensor:
    """The gate rows of every expert then every shared expert: (L, E + S, H) float32.
    ``model``: :func:`load_gate_model`'s, when already loaded (else loaded here)."""
    experts = (*cfg.experts, *cfg.shared_experts)
    if cfg.gate_mode in ("random", "uniform_random"):
        return random_gates(cfg.gate_mode, (layers, len(experts), hidden), cfg.seed)
    return prompt_gates(cfg, experts, base, layers, device, model)


def degenerate_layers(gates: torch.Tensor, threshold: float = 5.0) -> list[int]:
    """Layers whose gate matrix has condition number > ``threshold`` (mergekit's warning: the
    prompts are too alike for the router to separate the experts)."""
    return [i for i in range(gates.shape[0])
            if float(torch.linalg.cond(gates[i].float())) > threshold]  # fmt: skip
