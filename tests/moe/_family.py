"""Tiny dense Llama experts for the MoE tests, built in a temporary folder (no downloads).

A base (hidden 32, intermediate 48, 2 layers, vocabulary 100, a word-level tokenizer whose
tokens are ``w0`` .. ``w96`` plus ``<s>`` / ``</s>`` / ``[UNK]``) and experts that are the base
plus seeded noise of their own size, as fine-tunes would be. Prompts are written with ``w``
words so that every prompt token is in the vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

DIMS = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2}


def save_tokenizer(dst: Path) -> None:
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(97)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>",
                               eos_token="</s>").save_pretrained(dst)  # fmt: skip


def tiny_llama(*, tied: bool = False, seed: int = 0, **overrides):
    import transformers as tf

    torch.manual_seed(seed)
    kw = dict(DIMS, num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
              max_position_embeddings=64, tie_word_embeddings=tied, bos_token_id=1,
              eos_token_id=2)  # fmt: skip
    kw.update(overrides)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**kw))


def save(model, dst: Path, *, tokenizer: bool = True) -> Path:
    model.save_pretrained(dst)
    if tokenizer:
        save_tokenizer(dst)
    return dst


def family(root: Path, *, tied: bool = False, n_experts: int = 3) -> dict:
    """``{"base": path, "experts": [paths]}``: expert e = base + N(0, (0.05 (e + 1))²) noise."""
    model = tiny_llama(tied=tied)
    base = save(model, root / "base")
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    experts = []
    for e in range(n_experts):
        g = torch.Generator().manual_seed(10 + e)
        with torch.no_grad():
            for k, p in model.state_dict().items():
                p.copy_(sd[k] + torch.randn(p.shape, generator=g) * 0.05 * (e + 1))
        experts.append(save(model, root / f"e{e}"))
    return {"base": base, "experts": experts}


def set_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


PROMPTS = (
    (["w1 w2 w3", "w4 w5 w6 w7"], ["w60 w61"]),
    (["w10 w11 w12 w13", "w14"], []),
    (["w20 w21", "w22 w23 w24"], []),
    (["w30 w31 w32", "w33"], ["w70"]),
)


def moe_yaml(fam: dict, *, n: int | None = None, shared: bool = False, **top) -> dict:
    """A mergekit-moe config (as YAML loads it) over ``fam``'s first ``n`` experts, each with
    its :data:`PROMPTS`; ``shared``: the base as the one shared expert (mergekit 0.1.5 reads a
    shared expert only when it is the base or one of the experts)."""
    experts = fam["experts"][: n or len(fam["experts"])]
    cfg = {"base_model": str(fam["base"]), "gate_mode": "hidden", "experts_per_token": 2,
           "experts": []}  # fmt: skip
    for e, path in enumerate(experts):
        pos, neg = PROMPTS[e]
        d = {"source_model": str(path), "positive_prompts": pos}
        if neg:
            d["negative_prompts"] = neg
        cfg["experts"].append(d)
    if shared:
        cfg["shared_experts"] = [{"source_model": str(fam["base"]),
                                  "positive_prompts": ["w40 w41", "w42"]}]  # fmt: skip
    cfg.update(top)
    return cfg
