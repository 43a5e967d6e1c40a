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
* mergeforge: ``router_fit``: a router fitted to tell the experts' prompts apart, token by token.
  Prompt means of related domains are nearly collinear in a model's later layers, so a gate
  equal to one expert's mean direction routes poorly (BENCHMARKS.md §14: 17.5 % of the reviews
  domain's tokens to its expert). Here each layer's router is the multinomial logistic
  regression, without bias as the router has none, of the MLP inputs of every token of every
  positive prompt (BOS excluded) labelled with their expert: :func:`fit_router`, L-BFGS in
  float64, each expert's tokens weighted equally in total, an L2 penalty ``ROUTER_FIT_L2``.
  The rows are not unit vectors: their scale is the fit's, so the softmax weights of the
  top-k experts are calibrated probabilities. Shared experts (no routing) get the
  ``router_input_avg`` row; negative prompts are not used (a warning says so).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from mergeforge.checkpoint import Checkpoint
from mergeforge.errors import CheckpointError, ValidationError
from mergeforge.moe import forward
from mergeforge.moe.config import Expert, MoEConfig

EMBED = "model.embed_tokens.weight"
ROUTER_FIT_L2 = 1e-3
"""``router_fit``'s L2 penalty (on the sum of squared router weights; the data term is a mean
cross-entropy): small enough not to bias a well-separated fit, large enough to keep separable
prompts' weights finite."""


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
        router = cfg.gate_mode.startswith("router_")
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
    def router_inputs(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Per prompt (run alone: no padding), the MLP input of every layer at every position
        (BOS included): (L, T, H) float32 each."""
        if self.native is not None:
            out = []
            for p in prompts:
                enc = _batch(self.tok, [p])
                seen = self.native.mlp_inputs(enc["input_ids"], enc["attention_mask"])
                out.append(torch.stack([x[0] for x in seen]).float().cpu())
            return out
        seen: dict[int, torch.Tensor] = {}
        mlps = [self.model.model.layers[i].mlp for i in range(self.layers)]
        hooks = [m.register_forward_pre_hook(lambda _m, a, i=i: seen.__setitem__(i, a[0]))
                 for i, m in enumerate(mlps)]  # fmt: skip
        try:
            out = []
            for p in prompts:
                enc = _batch(self.tok, [p]).to(self.device)
                self.model.model(**enc)
                out.append(torch.stack([seen[i][0] for i in range(self.layers)]).float().cpu())
            return out
        finally:
            for h in hooks:
                h.remove()

    def _router_input(self, prompts: Sequence[str]) -> torch.Tensor:
        rows = [h.mean(dim=1) if self.mode != "router_input" else h[:, -1]
                for h in self.router_inputs(prompts)]  # fmt: skip
        return torch.stack(rows).mean(dim=0)


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
    if cfg.gate_mode == "router_fit":
        return _fitted_gates(run, cfg, experts)
    rows = []
    for e in experts:
        v = run(e.positive_prompts)
        if e.negative_prompts:
            v = v - run(e.negative_prompts)
        rows.append(unit(v))
    return torch.stack(rows, dim=1)


def _fitted_gates(run: _Runner, cfg: MoEConfig, experts: Sequence[Expert]) -> torch.Tensor:
    """``router_fit`` (module docstring): the routed experts' rows fitted layer by layer, the
    shared experts' rows as ``router_input_avg``."""
    n = len(cfg.experts)
    feats = []  # per routed expert: (L, T_e, H), every prompt token but BOS
    for e in experts[:n]:
        feats.append(torch.cat([h[:, 1:] for h in run.router_inputs(e.positive_prompts)], dim=1))
    rows = torch.stack([fit_router([f[i] for f in feats]) for i in range(run.layers)])
    if len(experts) > n:
        shared = [unit(run._router_input(e.positive_prompts)) for e in experts[n:]]
        rows = torch.cat([rows, torch.stack(shared, dim=1)], dim=1)
    return rows


def fit_router(features: Sequence[torch.Tensor], l2: float = ROUTER_FIT_L2,
               max_iter: int = 500) -> torch.Tensor:  # fmt: skip
    """The (E, H) router W minimising ``sum_e mean_{x in features[e]} CE(softmax(W x), e) / E +
    l2 / 2 * |W|^2`` (no bias; each class weighs the same whatever its token count): strictly
    convex, solved by L-BFGS in float64 from W = 0. ``features[e]``: (T_e, H), T_e >= 1."""
    E = len(features)
    if E < 2 or any(f.ndim != 2 or f.shape[0] == 0 for f in features):
        raise ValueError("fit_router needs two or more classes, each with at least one row")
    x = torch.cat([f.detach().double() for f in features])
    y = torch.cat([torch.full((len(f),), e, dtype=torch.long) for e, f in enumerate(features)])
    w = torch.cat([torch.full((len(f),), 1.0 / (E * len(f)), dtype=torch.float64)
                   for f in features])  # fmt: skip
    W = torch.zeros(E, x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-10, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        ce = F.cross_entropy(x @ W.T, y, reduction="none")
        loss = (w * ce).sum() + 0.5 * l2 * (W * W).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return W.detach().float()


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


def degenerate_layers(gates: torch.Tensor, threshold: float = 5.0,
                      gate_mode: str | None = None) -> list[int]:  # fmt: skip
    """Layers whose gate matrix has condition number > ``threshold`` (mergekit's warning: the
    prompts are too alike for the router to separate the experts). None for ``router_fit``:
    at the fit's optimum the routed rows sum to zero (adding one vector to every row changes no
    softmax, and the L2 term is least when their mean is zero), so its gate matrix has rank
    E - 1 and an unbounded condition number by construction, however well it routes; the
    routing report (:func:`mergeforge.moe.routing_report`) is that mode's diagnosis."""
    if gate_mode == "router_fit":
        return []
    return [i for i in range(gates.shape[0])
            if float(torch.linalg.cond(gates[i].float())) > threshold]  # fmt: skip
