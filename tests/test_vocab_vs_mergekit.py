"""Vocabulary merges against mergekit 0.1.5 (issue 18, item 2): ``tokenizer_source: union |
base | <model>``, a ``tokenizer:`` block (per-token ``source``, ``force``,
``pad_to_multiple_of``), models whose ``vocab_size`` differs, added tokens, tied embeddings.

Equal means: the same tensors (≤ 1e-6 in fp32; the embedding and head rows compared token by
token), the same ``config.json`` vocab_size, and the same tokenizer: the same token strings,
the same model vocabulary, the same added tokens with the same settings, the same special
tokens. For ``base`` and a model as the source the tokenizer files are byte-identical. For
``union`` the ids of the appended tokens differ: mergekit appends them in the iteration order
of a Rust hash map (a different order on every run: ``get_vocab()``), mergeforge in model order
then id order, so only strings and rows can be compared.
"""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import pytest
import torch
import transformers

import mergeforge
from tests.helpers import load_dir, run_mergekit, vocab_family

pytestmark = pytest.mark.mergekit

VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict[str, str]:
    return vocab_family(tmp_path_factory.mktemp("vocab"))


def _m(path: str, **params) -> dict:
    return {"model": path, **({"parameters": params} if params else {})}


def _cases(f: dict[str, str]) -> dict[str, dict]:
    base, sh, ad, tied = f["base"], f["shuffled"], f["added"], f["tied"]
    return {
        "union_linear": {
            "merge_method": "linear", "base_model": base,
            "models": [_m(base, weight=0.5), _m(sh, weight=0.3), _m(ad, weight=0.2)],
            "tokenizer_source": "union",
        },
        "union_ties_tied": {
            "merge_method": "ties", "base_model": base,
            "models": [_m(sh, weight=0.6, density=0.5), _m(ad, weight=0.4, density=0.7),
                       _m(tied, weight=0.5, density=0.6)],
            "parameters": {"normalize": True}, "tokenizer_source": "union",
        },
        "base_ties_vocab_sizes": {  # 33, 33 and 40 rows
            "merge_method": "ties", "base_model": base,
            "models": [_m(sh, weight=0.6, density=0.5), _m(ad, weight=0.4, density=0.7)],
            "tokenizer_source": "base",
        },
        "model_source_linear": {
            "merge_method": "linear", "base_model": base,
            "models": [_m(base, weight=0.5), _m(sh, weight=0.5)], "tokenizer_source": sh,
        },
        "model_source_task_arithmetic": {
            "merge_method": "task_arithmetic", "base_model": base,
            "models": [_m(ad, weight=0.5), _m(tied, weight=0.7)], "tokenizer_source": ad,
        },
        "block": {
            "merge_method": "linear", "base_model": base,
            "models": [_m(base, weight=0.5), _m(sh, weight=0.3), _m(ad, weight=0.2)],
            "tokenizer": {
                "source": "union", "pad_to_multiple_of": 16,
                "tokens": {
                    "w35": {"source": sh, "force": True},
                    "<x>": {"source": {"kind": "zero"}},
                    "w3": {"source": {"kind": "model_token", "model": ad, "token": "w4"},
                           "force": True},
                    "<new>": {"source": {"kind": "model_token", "model": base, "token_id": 2}},
                },
            },
        },
        "block_ties_pad": {
            "merge_method": "ties", "base_model": base,
            "models": [_m(sh, weight=0.6, density=0.5), _m(tied, weight=0.5, density=0.6)],
            "tokenizer": {"pad_to_multiple_of": 8},  # source: union (the default)
        },
        "union_stripped_base": {  # the base's tokenizer has 2 tokens past its vocab_size
            "merge_method": "linear", "base_model": f["long"],
            "models": [_m(f["long"], weight=0.5), _m(sh, weight=0.5)],
            "tokenizer_source": "union",
        },
        "union_slices_slerp": {
            "merge_method": "slerp", "base_model": base,
            "slices": [{"sources": [{"model": base, "layer_range": [0, 2]},
                                    {"model": tied, "layer_range": [0, 2]}]}],
            "parameters": {"t": 0.3}, "tokenizer_source": "union",
        },
        "union_no_base": {
            "merge_method": "linear",
            "models": [_m(sh, weight=0.5), _m(ad, weight=0.5)], "tokenizer_source": "union",
        },
    }  # fmt: skip


def _by_token(t: torch.Tensor, vocab: dict[str, int]) -> dict[str, torch.Tensor]:
    return {tok: t[i] for tok, i in vocab.items()}


def _tokenizer_facts(folder: Path) -> dict:
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    doc = json.loads((folder / "tokenizer.json").read_text())
    added = {t["content"]: {k: v for k, v in t.items() if k != "id"} for t in doc["added_tokens"]}
    return {
        "tokens": set(tok.get_vocab()),
        "model_vocab": doc["model"]["vocab"],
        "added": added,
        "special": tok.special_tokens_map,
        "config": json.loads((folder / "tokenizer_config.json").read_text()),
    }


@pytest.mark.parametrize("case", list(_cases({k: k for k in (
    "base", "shuffled", "added", "tied", "long")})))  # fmt: skip
def test_vocabulary_merge_equals_mergekit(fam, tmp_path, case):
    cfg = {**_cases(fam)[case], "dtype": "float32"}
    theirs = run_mergekit(cfg, tmp_path / "mergekit")
    mergeforge.merge(cfg, tmp_path / "ours", progress=False)
    ours = load_dir(tmp_path / "ours")
    assert set(ours) == set(theirs)

    vk = transformers.AutoTokenizer.from_pretrained(tmp_path / "mergekit").get_vocab()
    vo = transformers.AutoTokenizer.from_pretrained(tmp_path / "ours").get_vocab()
    assert set(vk) == set(vo)
    n = len(vk)
    for name, want in theirs.items():
        got = ours[name]
        assert got.shape == want.shape, name
        if name not in VOCAB:
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0, msg=name)
            continue
        a, b = _by_token(want, vk), _by_token(got, vo)
        for tok in vk:
            torch.testing.assert_close(b[tok], a[tok], atol=1e-6, rtol=0, msg=f"{name} {tok!r}")
        # padding rows (pad_to_multiple_of): each input's mean row, merged
        torch.testing.assert_close(got[n:], want[n:], atol=1e-6, rtol=0)

    ck = json.loads((tmp_path / "mergekit" / "config.json").read_text())
    co = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert co["vocab_size"] == ck["vocab_size"] == ours[VOCAB[0]].shape[0]

    fk, fo = _tokenizer_facts(tmp_path / "mergekit"), _tokenizer_facts(tmp_path / "ours")
    if "base_model" in cfg:
        assert fk == fo
    else:  # mergekit starts from a random input's tokenizer (the first of a set): not its files
        assert fk["tokens"] == fo["tokens"]
    source = (cfg.get("tokenizer") or {}).get("source", cfg.get("tokenizer_source", "union"))
    if source != "union":  # nothing hash-ordered: the files are the same bytes
        for f in ("tokenizer.json", "tokenizer_config.json"):
            assert (tmp_path / "ours" / f).read_bytes() == (tmp_path / "mergekit" / f).read_bytes()
    # and the output is a working model with its tokenizer
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    ids = transformers.AutoTokenizer.from_pretrained(tmp_path / "ours")(
        "w1 w35", return_tensors="pt"
    )
    assert model(**ids).logits.shape[-1] == co["vocab_size"]


def test_base_source_with_an_added_token_where_mergekit_crashes(fam, tmp_path):
    """mergekit 0.1.5 adds ``tokens`` entries to the base's own tokenizer object, so the base's
    row map then names a token id past its rows and the merge dies with ``KeyError: 33``;
    mergeforge adds them to a copy: the base lacks the token and it gets its fill row."""
    cfg = {
        "merge_method": "linear", "base_model": fam["base"], "dtype": "float32",
        "models": [_m(fam["base"], weight=0.5), _m(fam["shuffled"], weight=0.5)],
        "tokenizer": {"source": "base", "tokens": {"<new>": {"source": {"kind": "zero"}}}},
    }  # fmt: skip
    with pytest.raises(KeyError):
        run_mergekit(cfg, tmp_path / "mergekit")
    mergeforge.merge(cfg, tmp_path / "ours", progress=False)
    vocab = transformers.AutoTokenizer.from_pretrained(tmp_path / "ours").get_vocab()
    emb = load_dir(tmp_path / "ours")[VOCAB[0]]
    assert emb.shape[0] == 34 and vocab["<new>"] == 33 and not emb[33].any()


# ---- chat_template ---------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": " Hello! "}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    [{"role": "assistant", "content": "first"}],
    [{"role": "user_context", "content": "ctx"}, {"role": "user", "content": "q"}],
]  # fmt: skip


def _render(tok, template: str) -> list[str]:
    tok.chat_template = template
    out = []
    for conv in CONVERSATIONS:
        for gen in (False, True):
            try:
                out.append(tok.apply_chat_template(conv, tokenize=False,
                                                   add_generation_prompt=gen))  # fmt: skip
            except Exception as e:  # mistral's template refuses some conversations
                out.append(f"error: {e}")
    return out


@pytest.mark.parametrize("name", ["chatml", "llama3", "mistral"])
def test_named_chat_templates_render_as_mergekits(fam, name):
    from mergeforge.engine.vocab import CHAT_TEMPLATES

    theirs = importlib.resources.files("mergekit._data.chat_templates") / f"{name}.jinja"
    tok = transformers.AutoTokenizer.from_pretrained(fam["base"])
    assert _render(tok, CHAT_TEMPLATES[name]) == _render(tok, theirs.read_text())


@pytest.mark.parametrize(
    "template", ["chatml", "{% for m in messages %}{{ m['content'] }}|{% endfor %}"]
)
def test_chat_template_written_as_mergekit(fam, tmp_path, template):
    cfg = {
        "merge_method": "linear", "base_model": fam["base"], "dtype": "float32",
        "models": [_m(fam["base"], weight=0.5), _m(fam["shuffled"], weight=0.5)],
        "tokenizer_source": "union", "chat_template": template,
    }  # fmt: skip
    run_mergekit(cfg, tmp_path / "mergekit")
    mergeforge.merge(cfg, tmp_path / "ours", progress=False)
    tk = transformers.AutoTokenizer.from_pretrained(tmp_path / "mergekit")
    to = transformers.AutoTokenizer.from_pretrained(tmp_path / "ours")
    assert _render(to, to.chat_template) == _render(tk, tk.chat_template)
    assert sorted(p.name for p in (tmp_path / "ours").glob("chat_template*")) == sorted(
        p.name for p in (tmp_path / "mergekit").glob("chat_template*")
    )
