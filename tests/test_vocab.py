"""Vocabularies (issue 18, item 2) without mergekit: the fill rule worked by hand, the output
tokenizer and config, only the vocabulary tensors realigned, the bad inputs (each a clear error
naming the file or token, nothing written), the config schema, ``mergeforge validate``'s
report and ``chat_template``. tests/test_vocab_vs_mergekit.py compares with mergekit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
import yaml

import mergeforge
from mergeforge.cli import main
from mergeforge.config import load_config
from mergeforge.engine import merge_state_dicts, prepare
from mergeforge.errors import ConfigError, ValidationError
from tests.helpers import load_dir, vocab_family

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict[str, str]:
    return vocab_family(tmp_path_factory.mktemp("vocab"))


def _m(path: str, **params) -> dict:
    return {"model": path, **({"parameters": params} if params else {})}


def _vocab(folder) -> dict[str, int]:
    return transformers.AutoTokenizer.from_pretrained(folder).get_vocab()


def _rows(folder, name=EMB) -> dict[str, torch.Tensor]:
    """token -> its row of ``name`` in model ``folder`` (a tied model: its embedding)."""
    sd = load_dir(Path(folder))
    t = sd.get(name, sd[EMB])
    return {tok: t[i] for tok, i in _vocab(folder).items() if i < t.shape[0]}


def _yaml(tmp: Path, cfg: dict) -> Path:
    p = tmp / "merge.yml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _fails(tmp: Path, cfg: dict, capsys, *needles: str) -> str:
    out = tmp / "out"
    code = main(["merge", str(_yaml(tmp, cfg)), str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0
    assert not out.exists(), "a failed merge left something at the output path"
    assert not [p for p in tmp.iterdir() if "partial" in p.name]
    for n in needles:
        assert n in err, f"{n!r} not in error message: {err}"
    return err


# ---- the fill rule, by hand ------------------------------------------------------------------


def test_union_rows_by_hand(fam, tmp_path):
    """base (0.5) + shuffled (0.3) + added (0.2), linear: a token all have is their weighted
    mean; one the base and added have gets the base's row in shuffled; one only shuffled has,
    shuffled's row in all (so the merge is that row); the new tokens come after the base's in
    model order, then id order, added tokens last."""
    cfg = {
        "merge_method": "linear", "base_model": fam["base"], "dtype": "float32",
        "models": [_m(fam["base"], weight=0.5), _m(fam["shuffled"], weight=0.3),
                   _m(fam["added"], weight=0.2)],
        "tokenizer_source": "union",
    }  # fmt: skip
    res = mergeforge.merge(cfg, tmp_path / "out", progress=False)
    out = tmp_path / "out"
    vocab = _vocab(out)
    a, s, d = _rows(fam["base"]), _rows(fam["shuffled"]), _rows(fam["added"])
    assert [t for t, _ in sorted(vocab.items(), key=lambda x: x[1])][33:] == [
        *(f"w{i}" for i in range(39, 29, -1)), "<x>", "<|im_start|>",
    ]  # fmt: skip
    for name in (EMB, HEAD):
        got = load_dir(out)[name]
        a, s, d = _rows(fam["base"], name), _rows(fam["shuffled"], name), _rows(fam["added"], name)
        assert got.shape == (45, 32)
        for tok, want in [
            ("w15", 0.5 * a["w15"] + 0.3 * s["w15"] + 0.2 * d["w15"]),
            ("<s>", 0.5 * a["<s>"] + 0.3 * s["<s>"] + 0.2 * d["<s>"]),
            ("w2", 0.8 * a["w2"] + 0.2 * d["w2"]),
            ("w33", s["w33"]),
            ("<|im_start|>", d["<|im_start|>"]),
        ]:
            torch.testing.assert_close(got[vocab[tok]], want, atol=1e-6, rtol=0, msg=tok)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 45 == len(vocab)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.convert_ids_to_tokens(tok("w33 <|im_start|>")["input_ids"]) == [
        "w33", "<|im_start|>"]  # fmt: skip
    assert tok.added_tokens_decoder[vocab["<|im_start|>"]].special
    assert (
        transformers.AutoModelForCausalLM.from_pretrained(out).get_input_embeddings().num_embeddings
        == 45
    )
    assert res.tensors == len(load_dir(out))
    # the written tokenizer files are a merge's own: --overwrite replaces the output
    mergeforge.merge(cfg, out, progress=False, overwrite=True)


def test_mean_rule_and_tied_input_by_hand(fam, tmp_path):
    """No base: a token two of three inputs have gets their mean in the third; the tied input
    (no lm_head) contributes its realigned embedding to the head."""
    cfg = {
        "merge_method": "linear", "dtype": "float32", "tokenizer_source": "union",
        "models": [_m(fam["shuffled"], weight=0.5), _m(fam["tied"], weight=0.3),
                   _m(fam["added"], weight=0.2)],
    }  # fmt: skip
    mergeforge.merge(cfg, tmp_path / "out", progress=False)
    vocab, sd = _vocab(tmp_path / "out"), load_dir(tmp_path / "out")
    for name in (EMB, HEAD):
        s, t, d = (_rows(fam[k], name) for k in ("shuffled", "tied", "added"))
        got = sd[name]
        for tok, want in [
            ("w31", 0.5 * s["w31"] + 0.3 * t["w31"] + 0.2 * (s["w31"] + t["w31"]) / 2),
            ("w7", 0.5 * (t["w7"] + d["w7"]) / 2 + 0.3 * t["w7"] + 0.2 * d["w7"]),
            ("w1", d["w1"]),
            ("w37", s["w37"]),
            ("<x>", 0.5 * (t["<x>"] + d["<x>"]) / 2 + 0.3 * t["<x>"] + 0.2 * d["<x>"]),
        ]:
            torch.testing.assert_close(got[vocab[tok]], want, atol=1e-6, rtol=0, msg=tok)


def test_token_sources_force_and_padding_by_hand(fam, tmp_path):
    base, sh = fam["base"], fam["shuffled"]
    cfg = {
        "merge_method": "linear", "base_model": base, "dtype": "float32",
        "models": [_m(base, weight=0.5), _m(sh, weight=0.5)],
        "tokenizer": {
            "source": "base", "pad_to_multiple_of": 8,
            "tokens": {
                "w12": {"source": {"kind": "zero"}, "force": True},  # both have it: forced
                "w3": {"source": {"kind": "model_token", "model": sh, "token": "w30"}},
                "<new>": {},  # in no model, no source: zeros
            },
        },
    }  # fmt: skip
    mergeforge.merge(cfg, tmp_path / "out", progress=False)
    vocab, got = _vocab(tmp_path / "out"), load_dir(tmp_path / "out")[EMB]
    a, s = _rows(base), _rows(sh)
    assert len(vocab) == 34 and got.shape == (40, 32)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 40
    assert not got[vocab["w12"]].any()
    torch.testing.assert_close(got[vocab["w3"]], 0.5 * a["w3"] + 0.5 * s["w30"])
    torch.testing.assert_close(got[vocab["w20"]], 0.5 * a["w20"] + 0.5 * s["w20"])
    # padding: each input's mean realigned row, merged
    realigned = []
    for rows in (a, s):  # a token the model lacks: the base's row, w3 shuffled's w30, else 0
        fill = {**a, "w3": s["w30"], "<new>": torch.zeros(32)}
        r = torch.stack([rows.get(t, fill[t]) for t in sorted(vocab, key=vocab.get)])
        r[vocab["w12"]] = 0
        realigned.append(r.mean(0))
    torch.testing.assert_close(got[34:], (0.5 * realigned[0] + 0.5 * realigned[1]).expand(6, 32),
                               atol=1e-6, rtol=0)  # fmt: skip


def test_realigned_rows_in_blocks_equal_the_whole_realignment(fam):
    """An element-wise merge reads a vocabulary tensor a block of rows at a time
    (``VocabPlan.realign_rows``): every block size and compute dtype gives exactly the rows
    that re-laying each whole input gives (own rows, copied, mean and zero fills, forced)."""
    cfg = {
        "merge_method": "linear", "dtype": "float32",
        "models": [_m(fam["shuffled"], weight=0.5), _m(fam["tied"], weight=0.3),
                   _m(fam["added"], weight=0.2)],
        "tokenizer": {"source": "union", "tokens": {
            "w12": {"source": {"kind": "zero"}, "force": True},
            "w3": {"source": {"kind": "model_token", "model": fam["shuffled"], "token": "w30"}},
            "<new>": {}}},
    }  # fmt: skip
    plan = prepare(cfg)
    try:
        assert plan.vocab.size == plan.vocab.n_tokens
        for name in (EMB, HEAD):
            job = next(j for j in plan.jobs if j.out_name == name)
            refs = ([job.base] if job.base is not None else []) + list(job.inputs)
            models = [r.model for r in refs]
            raws = [plan.checkpoints[r.model].get(r.name) for r in refs]
            n = plan.vocab.size
            for dtype in (None, torch.bfloat16):
                conv = raws if dtype is None else [t.to(dtype) for t in raws]
                whole = plan.vocab.realign(name, models, conv)
                rows = plan.vocab.realign_rows(name, models, raws, dtype)
                for step in (1, 5, 16, n):
                    blocks = [rows(s, min(n, s + step)) for s in range(0, n, step)]
                    for k, want in enumerate(whole):
                        got = torch.cat([b[k] for b in blocks])
                        assert got.dtype == want.dtype and torch.equal(got, want), (name, step)
    finally:
        plan.close()


def test_only_the_vocabulary_tensors_are_realigned(fam, tmp_path):
    """Every other tensor equals a merge that realigns nothing; the plan realigns only the
    embedding and the head."""
    models = [_m(fam["base"], weight=0.4), _m(fam["shuffled"], weight=0.6)]
    union = {"merge_method": "linear", "models": models, "tokenizer_source": "union"}
    by_id = {"merge_method": "linear", "models": models, "allow_vocab_mismatch": True}
    plan = prepare(union)
    try:
        assert plan.vocab.tensors == {EMB, HEAD}
    finally:
        plan.close()
    mergeforge.merge(union, tmp_path / "u", progress=False)
    mergeforge.merge(by_id, tmp_path / "i", progress=False)
    u, i = load_dir(tmp_path / "u"), load_dir(tmp_path / "i")
    assert set(u) == set(i)
    for k in u:
        if k not in (EMB, HEAD):
            assert torch.equal(u[k], i[k]), k
    # in memory too: the same realignment (the models are read from their folders)
    mem = merge_state_dicts(union, {})
    for k in u:
        assert torch.equal(mem[k], u[k]), k


def test_an_excluded_embedding_is_the_base_realigned(fam, tmp_path):
    cfg = {"merge_method": "ties", "base_model": fam["base"], "tokenizer_source": "union",
           "exclude": ["embed_tokens"], "dtype": "float32",
           "models": [_m(fam["shuffled"], weight=1.0, density=0.5)]}  # fmt: skip
    mergeforge.merge(cfg, tmp_path / "out", progress=False)
    vocab, got = _vocab(tmp_path / "out"), load_dir(tmp_path / "out")[EMB]
    a, s = _rows(fam["base"]), _rows(fam["shuffled"])
    assert got.shape == (43, 32)
    for tok in ("w3", "w20", "<s>"):
        assert torch.equal(got[vocab[tok]], a[tok])
    assert torch.equal(got[vocab["w35"]], s["w35"])  # the base lacks it: the one that has it


def test_same_tokenizers_realign_nothing(fam, tmp_path):
    cfg = {"merge_method": "linear", "tokenizer_source": "union",
           "models": [_m(fam["base"]), _m(fam["same"])]}  # fmt: skip
    plan = prepare(cfg)
    try:
        assert plan.vocab.tensors == set() and plan.vocab.size == 33
    finally:
        plan.close()
    mergeforge.merge(cfg, tmp_path / "u", progress=False)
    mergeforge.merge({**cfg, "tokenizer_source": None}, tmp_path / "d", progress=False)
    u, d = load_dir(tmp_path / "u"), load_dir(tmp_path / "d")
    assert all(torch.equal(u[k], d[k]) for k in d)
    assert _vocab(tmp_path / "u") == _vocab(fam["base"])


def test_base_source_assumes_the_base_tokenizer_for_a_model_without_one(fam, tmp_path):
    cfg = {"merge_method": "linear", "base_model": fam["base"], "tokenizer_source": "base",
           "models": [_m(fam["base"]), _m(fam["no_tokenizer"])]}  # fmt: skip
    res = mergeforge.merge(cfg, tmp_path / "out", progress=False)
    assert any("no_tokenizer has no tokenizer files" in w for w in res.warnings)
    assert (tmp_path / "out" / "tokenizer.json").is_file()


# ---- bad inputs: a clear error, nothing written ------------------------------------------------


def test_union_with_a_tokenizer_file_missing(fam, tmp_path, capsys):
    cfg = {"merge_method": "linear", "tokenizer_source": "union",
           "models": [_m(fam["base"]), _m(fam["no_tokenizer"])]}  # fmt: skip
    _fails(tmp_path, cfg, capsys, fam["no_tokenizer"], "missing tokenizer.json", "union")


def test_union_with_an_unreadable_tokenizer_file(fam, tmp_path, capsys):
    bad = Path(shutil.copytree(fam["shuffled"], tmp_path / "bad"))
    (bad / "tokenizer.json").write_text("{not json")
    cfg = {"merge_method": "linear", "tokenizer_source": "union",
           "models": [_m(fam["base"]), _m(str(bad))]}  # fmt: skip
    _fails(tmp_path, cfg, capsys, str(bad), "tokenizer.json", "cannot be loaded")


def test_conflicting_token_ids_without_a_tokenizer_option(fam, tmp_path, capsys):
    """Same vocab_size, tokens at other ids: mergekit would merge the rows by id, silently."""
    cfg = {"merge_method": "linear", "models": [_m(fam["base"]), _m(fam["shuffled"])]}
    _fails(tmp_path, cfg, capsys, "token 'w29' has id 11",
           f"{fam['shuffled']}/tokenizer.json", "tokenizer_source: union")  # fmt: skip


def test_different_vocab_size_without_a_tokenizer_option(fam, tmp_path, capsys):
    cfg = {"merge_method": "linear", "models": [_m(fam["base"]), _m(fam["added"])]}
    _fails(tmp_path, cfg, capsys, "vocab_size 33", "40", fam["added"], "tokenizer_source: union")


def test_tokens_past_vocab_size_are_no_conflict(fam):
    """``long`` has the base's tokens plus two past its vocab_size (no rows): merged by id."""
    plan = prepare({"merge_method": "linear", "models": [_m(fam["base"]), _m(fam["long"])]})
    plan.close()
    assert not any("tokens" in w and "lacks" in w for w in plan.warnings)


@pytest.mark.parametrize(
    ("tokens", "error", "needles"),
    [
        ({"w35": {"source": "/nowhere/model"}}, ConfigError, ["'w35'", "not one of the merged"]),
        ({"w35": {"source": "BASE"}}, ValidationError, ["'w35'", "has no token 'w35'"]),
        ({"w35": {"source": {"kind": "model_token", "model": "BASE", "token": "nope"}}},
         ValidationError, ["'w35'", "no token 'nope'"]),
        ({"w35": {"source": {"kind": "model_token", "model": "BASE", "token_id": 99}}},
         ValidationError, ["row 99"]),
    ],
)  # fmt: skip
def test_bad_token_sources_name_the_token(fam, tokens, error, needles):
    tokens = {k: json.loads(json.dumps(v).replace("BASE", fam["base"])) for k, v in tokens.items()}
    cfg = {"merge_method": "linear", "base_model": fam["base"],
           "models": [_m(fam["base"]), _m(fam["shuffled"])],
           "tokenizer": {"tokens": tokens}}  # fmt: skip
    with pytest.raises(error) as e:
        prepare(cfg).close()
    for n in needles:
        assert n in str(e.value), str(e.value)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"tokenizer_source": "union", "tokenizer": {"source": "union"}}, "only one of"),
        ({"tokenizer_source": 3}, "'union', 'base' or a model path"),
        ({"tokenizer": {"sourc": "union"}}, "Did you mean 'source'"),
        ({"tokenizer": {"pad_to_multiple_of": 0}}, "pad_to_multiple_of"),
        ({"tokenizer": {"tokens": {"<x>": {"force": True}}}}, "needs a 'source:'"),
        ({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "one"}}}}}, "not a token source"),
        ({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "model_token", "model": "a"}}}}},
         "exactly one of 'token:'"),
        ({"tokenizer_source": "union", "allow_vocab_mismatch": True}, "give only one"),
        ({"chat_template": "chatm"}, "neither 'auto', a template name"),
        ({"chat_template": "alpaca"}, "stray whitespace"),
    ],
)  # fmt: skip
def test_config_errors(extra, needle):
    with pytest.raises(ConfigError) as e:
        load_config({"merge_method": "linear", "models": [{"model": "a"}], **extra})
    assert needle in str(e.value)


def test_config_reads_mergekits_tokenizer_block():
    cfg = load_config({
        "merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}],
        "tokenizer": {"pad_to_multiple_of": 64, "tokens": {
            "<a>": {"source": "b"}, "<b>": {"source": {"kind": "zero"}, "force": True},
            "<c>": {"source": {"kind": "model_token", "model": {"model": "a"}, "token_id": 3}},
            "<d>": None,
        }},
    })  # fmt: skip
    t = cfg.tokenizer
    assert t.source == "union" and t.pad_to_multiple_of == 64
    assert t.tokens["<a>"].source.model == "b" and not t.tokens["<a>"].force
    assert t.tokens["<b>"].source.kind == "zero" and t.tokens["<b>"].force
    assert (t.tokens["<c>"].source.model, t.tokens["<c>"].source.token_id) == ("a", 3)
    assert t.tokens["<d>"].source is None


# ---- the report of `mergeforge validate` -------------------------------------------------------


def test_validate_reports_how_vocabularies_differ(fam, tmp_path, capsys):
    cfg = {"merge_method": "linear", "base_model": fam["base"], "tokenizer_source": "union",
           "models": [_m(fam["base"]), _m(fam["shuffled"]), _m(fam["added"])]}  # fmt: skip
    assert main(["validate", str(_yaml(tmp_path, cfg))]) == 0
    out = capsys.readouterr().out.splitlines()
    table = {line.split()[0]: line.split()[1:] for line in out if line.startswith("  /")}
    #        vocab_size, tokens, added, shared, new, moved
    assert table[fam["base"]] == ["33", "33", "3", "33", "0", "0"]
    assert table[fam["shuffled"]] == ["33", "33", "3", "33", "10", "20"]
    assert table[fam["added"]] == ["40", "35", "5", "35", "2", "0"]
    summary = next(line for line in out if line.startswith("output vocabulary (union)"))
    assert "45 tokens" in summary and "in every model 23" in summary
    assert any(line.startswith("ok: linear") for line in out)


def test_validate_reports_before_refusing(fam, tmp_path, capsys):
    cfg = {"merge_method": "linear", "models": [_m(fam["base"]), _m(fam["shuffled"])]}
    assert main(["validate", str(_yaml(tmp_path, cfg))]) != 0
    captured = capsys.readouterr()
    assert "rows merged by id" in captured.out and "'w29' 30->11" in captured.out
    assert "tokenizers differ" in captured.err


# ---- chat_template ---------------------------------------------------------------------------


def _with_template(src: str, dst: Path, template: str | None) -> str:
    shutil.copytree(src, dst)
    tok = transformers.AutoTokenizer.from_pretrained(dst)
    tok.chat_template = template
    tok.save_pretrained(dst)
    return str(dst)


def test_chat_template_auto_takes_the_most_common(fam, tmp_path):
    one = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    two = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    a = _with_template(fam["base"], tmp_path / "a", one)
    b = _with_template(fam["same"], tmp_path / "b", two)
    c = _with_template(fam["shuffled"], tmp_path / "c", two)
    cfg = {"merge_method": "linear", "base_model": a, "tokenizer_source": "union",
           "chat_template": "auto", "models": [_m(a), _m(b), _m(c)]}  # fmt: skip
    mergeforge.merge(cfg, tmp_path / "out", progress=False)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out").chat_template == two


def test_chat_template_without_a_tokenizer_option(fam, tmp_path):
    """The reference's tokenizer is written with the template (mergekit re-saves it too); with
    copy_tokenizer off nothing is, as in mergekit."""
    cfg = {"merge_method": "linear", "chat_template": "chatml",
           "models": [_m(fam["base"]), _m(fam["same"])]}  # fmt: skip
    mergeforge.merge(cfg, tmp_path / "out", progress=False)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == (
        "<|im_start|>user\nhi<|im_end|>\n"
    )
    mergeforge.merge(cfg, tmp_path / "bare", progress=False, copy_tokenizer=False)
    assert not (tmp_path / "bare" / "tokenizer.json").exists()


# ---- which tensors are vocabulary tensors: mergekit's facts ------------------------------------


def _mergekit_weights() -> tuple[set[str], set[str], list[str]]:
    """(vocabulary-axis weights, other loose weights, layer-template weights with a vocabulary
    axis) of mergekit 0.1.5's architecture tables, under their module prefixes, aliases too."""
    from importlib import resources

    vocab, other, layer_vocab = set(), set(), []
    for f in resources.files("mergekit._data.architectures").iterdir():
        if not f.name.endswith(".json"):
            continue
        d = json.loads(f.read_text())
        mods = d["modules"] if d.get("kind") == "modular" else {"": {"architecture": d}}
        for m in mods.values():
            a, prefix = m["architecture"], m.get("weight_prefix") or ""
            if prefix and not prefix.endswith("."):  # whisper.json's "model.decoder" typo
                prefix += "."
            for w in a.get("pre_weights", []) + a.get("post_weights", []):
                for n in [w["name"], *(w.get("aliases") or ())]:
                    (vocab if w.get("vocabulary_axis") is not None else other).add(prefix + n)
            layer_vocab += [w["name"] for w in a.get("layer_templates", {}).get("weights", [])
                            if w.get("vocabulary_axis") is not None]  # fmt: skip
    return vocab, other, layer_vocab


@pytest.mark.mergekit
def test_vocabulary_tensor_table_matches_mergekit():
    """Every weight of mergekit's tables with a vocabulary axis (module prefixes, aliases) is a
    vocabulary tensor here and nothing else is; every other one is known not to be one."""
    from mergeforge.engine.vocab import (
        NON_VOCAB_TENSORS,
        VOCAB_TENSORS,
        is_vocab_tensor,
        known_non_vocabulary,
    )

    vocab, other, layer_vocab = _mergekit_weights()
    assert not layer_vocab  # a tensor of a numbered layer is never one
    expand = lambda n: [n.replace("${num_layers}", str(k)) for k in (1, 24)]  # noqa: E731
    for name in vocab:
        for n in expand(name):
            assert is_vocab_tensor(n) and not known_non_vocabulary(n), n
    for name in other:
        for n in expand(name):
            assert not is_vocab_tensor(n) and known_non_vocabulary(n), n
    assert VOCAB_TENSORS == {n for n in vocab if "${" not in n}
    assert NON_VOCAB_TENSORS == {n for n in other if "${" not in n}
    assert "language_model.model.embed_tokens.weight" in VOCAB_TENSORS  # Mistral 3's
    assert is_vocab_tensor("layers.25.linear.weight") and not is_vocab_tensor("layers.3.ln.bias")


def _vlm_pair(root: Path) -> tuple[str, str, list[str], list[str]]:
    """Two tiny Mistral 3 VLMs (mergekit's tensor names, 32 vocabulary rows) with tokenizers:
    a's words w0..w28, b's in another order with 4 new ones."""
    from tests.helpers import tiny_tokenizer
    from tests.test_modules_config import mistral3

    a, b = mistral3(root / "a", 0), mistral3(root / "b", 1)
    wa = [f"w{i}" for i in range(29)]
    wb = [f"w{i}" for i in range(28, 3, -1)] + ["x1", "x2", "x3", "x4"]
    tiny_tokenizer(wa).save_pretrained(a)
    tiny_tokenizer(wb).save_pretrained(b)
    return a, b, wa, wb


def test_vlm_union_realigns_the_prefixed_embeddings(tmp_path):
    """A modular checkpoint's vocabulary tensors (``language_model.model.embed_tokens.weight``,
    ``language_model.lm_head.weight``) are realigned: as many rows as the output vocabulary and
    config.json say, each token's rows merged with its rows in the other model."""
    a, b, _, _ = _vlm_pair(tmp_path)
    cfg = {"merge_method": "linear", "dtype": "float32", "tokenizer_source": "union",
           "models": [_m(a, weight=0.5), _m(b, weight=0.5)]}  # fmt: skip
    mergeforge.merge(cfg, tmp_path / "out", progress=False)
    out, vocab = load_dir(tmp_path / "out"), _vocab(tmp_path / "out")
    va, vb = _vocab(a), _vocab(b)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert len(vocab) == 36 == config["text_config"]["vocab_size"]
    for name in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        ea, eb, got = load_dir(Path(a))[name], load_dir(Path(b))[name], out[name]
        assert got.shape == (36, 8), name
        for tok in ("w10", "w20", "<s>"):
            want = 0.5 * (ea[va[tok]] + eb[vb[tok]])
            torch.testing.assert_close(got[vocab[tok]], want, atol=1e-6, rtol=0)
        # a token one model lacks: that model's row is the other's
        torch.testing.assert_close(got[vocab["w0"]], ea[va["w0"]], atol=1e-6, rtol=0)
        torch.testing.assert_close(got[vocab["x3"]], eb[vb["x3"]], atol=1e-6, rtol=0)
    # every other tensor: merged by position, as without a tokenizer option
    other = {k for k in out if "embed_tokens" not in k and "lm_head" not in k}
    ta, tb = load_dir(Path(a)), load_dir(Path(b))
    assert all(torch.allclose(out[k], 0.5 * (ta[k] + tb[k]), atol=1e-6) for k in other)


@pytest.mark.mergekit
def test_vlm_union_equals_mergekit(tmp_path):
    """The same merge as mergekit's (its Mistral 3 table realigns the prefixed tensors)."""
    from tests.helpers import run_mergekit

    a, b, _, _ = _vlm_pair(tmp_path)
    cfg = {"merge_method": "linear", "dtype": "float32", "tokenizer_source": "union",
           "models": [_m(a, weight=0.5), _m(b, weight=0.5)]}  # fmt: skip
    theirs = run_mergekit(cfg, tmp_path / "mergekit")
    mergeforge.merge(cfg, tmp_path / "ours", progress=False)
    ours = load_dir(tmp_path / "ours")
    assert set(ours) == set(theirs)
    vk, vo = _vocab(tmp_path / "mergekit"), _vocab(tmp_path / "ours")
    assert set(vk) == set(vo)
    for name, want in theirs.items():
        got = ours[name]
        assert got.shape == want.shape, name
        if "embed_tokens" in name or "lm_head" in name:  # rows by token (union's order differs)
            for tok in vk:
                torch.testing.assert_close(got[vo[tok]], want[vk[tok]], atol=1e-6, rtol=0)
        else:
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0, msg=name)
    ck = json.loads((tmp_path / "mergekit" / "config.json").read_text())
    co = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert co["text_config"]["vocab_size"] == ck["text_config"]["vocab_size"] == 36


def test_an_unknown_tensor_of_vocabulary_size_is_refused(fam, tmp_path, capsys):
    """A realigning merge refuses, before any tensor is merged, a tensor that has as many rows
    as the vocabulary but is neither a known vocabulary tensor nor known to be anything else
    (it would be merged by id beside realigned embeddings); 'exclude:' copies it unchanged."""
    from tests.helpers import write_model

    folders = {}
    for k, src in (("base", "base"), ("shuffled", "shuffled"), ("same", "base")):
        folders[k] = Path(shutil.copytree(fam[src], tmp_path / k))
        sd = load_dir(folders[k])
        sd["model.token_bias.weight"] = torch.randn(33, 32)  # a per-token table of some kind
        for f in folders[k].glob("*.safetensors"):
            f.unlink()
        write_model(folders[k], sd)
    cfg = {"merge_method": "linear", "tokenizer_source": "union",
           "models": [_m(str(folders["base"])), _m(str(folders["shuffled"]))]}  # fmt: skip
    err = _fails(tmp_path, cfg, capsys, "'model.token_bias.weight'", "33 rows",
                 "as many as the vocabulary of",
                 "exclude: ['model.token_bias.weight']")  # fmt: skip
    assert "Traceback" not in err
    plan = prepare({**cfg, "exclude": ["model.token_bias.weight"]})
    plan.close()
    # the same tensor in models that share a tokenizer: nothing moves, nothing refused
    plan = prepare({**cfg, "models": [_m(str(folders["base"])), _m(str(folders["same"]))]})
    plan.close()


def test_output_never_inside_or_over_the_tokenizer_source(fam, tmp_path, capsys):
    """A ``tokenizer_source`` model that is not merged is still an input: the output may not be
    it (not even with --overwrite), lie inside it or contain it; nothing is written."""
    from tests.helpers import sha_tree

    tsrc = Path(shutil.copytree(fam["shuffled"], tmp_path / "tsrc"))
    before = sha_tree(tsrc)
    cfg = {"merge_method": "linear", "tokenizer_source": str(tsrc),
           "models": [_m(fam["base"], weight=0.5), _m(fam["same"], weight=0.5)]}  # fmt: skip
    p = _yaml(tmp_path, cfg)
    for out, flags, how in [(tsrc / "merged", [], "lies inside"),
                            (tsrc, ["--overwrite"], "is the input"),
                            (tmp_path, ["--overwrite"], "contains the input")]:  # fmt: skip
        code = main(["merge", str(p), str(out), "--no-progress", *flags])
        err = capsys.readouterr().err
        assert code != 0 and how in err and f"'tokenizer_source: {tsrc}'" in err, err
        assert sha_tree(tsrc) == before
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".")]
    with pytest.raises(ConfigError, match="tokenizer_source"):
        mergeforge.merge(cfg, tsrc / "x", progress=False)
    assert sha_tree(tsrc) == before


# ---- the tokenizer class decision, cached -----------------------------------------------------

_LOAD = (
    "import sys; from pathlib import Path; "
    "from mergeforge.checkpoint.tokenizer import load_tokenizer; "
    "t = load_tokenizer(Path(sys.argv[1]), 'm'); "
    "print(type(t).__name__, len(t.get_vocab()), "
    "'transformers.models.auto.tokenization_auto' in sys.modules)"
)


def _load_in_child(folder: str, cache: Path) -> list[str]:
    import os
    import subprocess
    import sys

    env = {**os.environ, "MERGEFORGE_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", _LOAD, folder], env=env, check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return out.split()


def test_the_generic_tokenizer_decision_is_kept_per_transformers_version(fam, tmp_path):
    """Whether AutoTokenizer honours a declared generic class is read from transformers'
    tables once, then from the cache home: the second process loads the same tokenizer
    without importing ``tokenization_auto``; a false answer in the cache sends the load to
    ``AutoTokenizer`` (which imports it), and a corrupt cache file is answered afresh and
    rewritten."""
    from mergeforge.checkpoint.tokenizer import GENERIC_DECISIONS

    cache = tmp_path / "cache"
    first = _load_in_child(fam["base"], cache)
    assert first == ["TokenizersBackend", "33", "True"]
    path = cache / GENERIC_DECISIONS.format(version=transformers.__version__)
    assert json.loads(path.read_text()) == {"llama": True}
    assert _load_in_child(fam["base"], cache) == ["TokenizersBackend", "33", "False"]
    path.write_text(json.dumps({"llama": False}))
    # AutoTokenizer (which imports tokenization_auto) loads it, as the same class here
    assert _load_in_child(fam["base"], cache) == ["TokenizersBackend", "33", "True"]
    path.write_text("{not json")
    assert _load_in_child(fam["base"], cache) == first
    assert json.loads(path.read_text()) == {"llama": True}
