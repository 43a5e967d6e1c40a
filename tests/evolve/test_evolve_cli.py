"""``mergeforge evolve CONFIG`` end to end on tiny Hugging Face models built here: a user's
pool (texts, labels, a head per task) scores a BERT encoder; a language model's loss scores a
Llama. The merged model is written and loads; a second run resumes the finished search."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from tests.helpers import make_family

from mergeforge.cli import main
from mergeforge.config import load_config
from mergeforge.evolve import evolve

pytest.importorskip("cmaes")


def word_tokenizer(folder, inputs=("input_ids", "token_type_ids", "attention_mask")) -> None:
    """A whitespace tokenizer of the words w2 … w127 (ids 2 … 127; 0 pad, 1 unknown)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                            eos_token="[PAD]", model_input_names=list(inputs)
                            ).save_pretrained(folder)  # fmt: skip


def texts(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(f"w{int(i)}" for i in torch.randint(2, 128, (6,), generator=g))
            for _ in range(n)]  # fmt: skip


@pytest.fixture
def bert_pool(tmp_path):
    from torch import nn

    from mergeforge.evaluate.text.eval import save_head

    fam = make_family(tmp_path, "bert", n_experts=2)
    word_tokenizer(fam["base"])
    tasks = []
    for t in range(2):
        torch.manual_seed(t)
        save_head(nn.Linear(32, 2), ["no", "yes"], tmp_path / f"head{t}")
        rows = [{"text": x, "label": ["no", "yes"][i % 2]} for i, x in enumerate(texts(12, t))]
        tasks.append({"name": f"task{t}", "examples": rows, "head": f"head{t}"})
    cfg = {
        "genome": {"models": [p.name for p in fam["experts"]], "base_model": fam["base"].name,
                   "merge_method": "ties", "layer_groups": 3},
        "fitness": {"tasks": tasks, "max_length": 8},
        "search": {"evaluations": 8, "population": 4, "seed": 0},
    }  # fmt: skip
    path = tmp_path / "evolve.yaml"
    path.write_text(yaml.safe_dump(cfg))  # relative paths: read against the YAML's folder
    return path


def test_the_cli_runs_a_pool_search_and_writes_the_model(bert_pool, tmp_path, capsys):
    from mergeforge.evaluate.text.eval import load_encoder

    out = tmp_path / "search"
    argv = ["evolve", str(bert_pool), "--out", str(out), "--workers", "0", "--no-progress"]
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "best fitness" in said and "after 8 evaluations (0 failed)" in said
    assert f"merged model: {out / 'model'}" in said
    hist = json.loads((out / "history.json").read_text())["candidates"]
    assert all(0 <= r["fitness"] <= 1 and set(r["metrics"]) >= {"task0", "task1/loss"}
               for r in hist)  # fmt: skip
    best = load_config(out / "best.yaml")
    assert best.merge_method == "ties" and len(best.slices) == 3
    encoder = load_encoder(out / "model")  # every weight from the files
    assert type(encoder).__name__ == "BertModel"
    # the same command again: the finished search is resumed, not re-run
    assert main(argv) == 0
    assert "resumed after generation 2" in capsys.readouterr().out


def test_a_language_model_pool(tmp_path):
    fam = make_family(tmp_path, "llama", n_experts=2)
    word_tokenizer(fam["base"], inputs=("input_ids", "attention_mask"))
    cfg = {
        "genome": {"models": [str(p) for p in fam["experts"]], "base_model": str(fam["base"]),
                   "merge_method": ["task_arithmetic", "ties"],
                   "shared": {"lambda": [0.5, 1.5]}},
        "fitness": {"texts": texts(6, 0), "max_length": 8},
        "search": {"evaluations": 8, "population": 4, "workers": 0},
    }  # fmt: skip
    res = evolve(cfg, progress=False, out=tmp_path / "out")
    assert res.evaluations == 8 and res.failed == 0
    assert {r["method"] for r in res.history} <= {"task_arithmetic", "ties"}
    r = res.history[0]
    assert r["fitness"] == pytest.approx(-r["metrics"]["loss"])
    assert r["metrics"]["perplexity"] == pytest.approx(math.exp(r["metrics"]["loss"]), rel=1e-5)
    assert "lambda" in res.best_config["parameters"]
