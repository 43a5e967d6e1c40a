"""mergekit's own example YAMLs, drop-in (issue 18, the drop-in count).

Every file of ``examples/`` in github.com/arcee-ai/mergekit (tests/data/mergekit_examples/, each
with a first comment line naming its commit; the text is otherwise the original) is run here
with its model ids replaced by tiny local checkpoints of the same architecture family:

* 13B Llama-2 ids -> a 40-layer tiny Llama (so every ``layer_range`` stays valid, no mapping);
  Mistral-7B ids -> a tiny Mistral; ``gpt2`` -> a 12-layer tiny GPT-2; Qwen2-VL -> a tiny
  Qwen2-VL checkpoint with the tensor names of the Hub's Qwen2-VL-7B (mergekit's table);
  Florence-2 -> a tiny ``Florence2ForConditionalGeneration``; Whisper -> a tiny Whisper;
  the placeholders of some examples (``model_a``, ``instruction_model_path``) -> tiny Llamas.

Outcomes (the table is :data:`EXAMPLES`, the same list is in BENCHMARKS.md section 11):

* ``equal``: ``mergeforge merge`` runs the YAML and writes mergekit 0.1.5's tensors. The examples
  compute in float16/bfloat16 (their ``dtype``), where TIES' top-k may break ties between equal
  magnitudes differently, so the YAML as written is compared element-wise with a tolerance
  (``FP16_CLOSE``), and the same YAML with ``dtype: float32`` to 1e-6;
* ``refused``: not a config mergekit 0.1.5 runs either (a method or format of a later or
  unmerged mergekit); both refuse it, and mergeforge's error names the key or method;
* ``refused_by_mergeforge``: mergekit 0.1.5 silently drops a key mergeforge refuses on purpose
  (the error names it and the alternative); without that key both give the same tensors;
* ``runs``: a method no mergekit release has (``ranked_ties``, of the ``ties.yml`` on a 2024
  branch): mergeforge runs it and the output loads with ``transformers``; the method's oracle
  (a transcription of that branch's definition, bit for bit on the same RNG stream) is
  tests/methods/test_ranked_ties.py.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from mergeforge.cli import main
from tests.helpers import load_dir, run_mergekit, write_model

DATA = Path(__file__).parent / "data" / "mergekit_examples"


@dataclass(frozen=True)
class Example:
    outcome: str  # equal | refused | refused_by_mergeforge | runs
    note: str
    needles: tuple[str, ...] = ()
    """What mergeforge's error says (refused ones)."""
    oracle: str = "mergekit"
    """``mergekit``, or ``hand`` (mergekit 0.1.5 cannot run it here: a hand-worked result)."""
    dtype_note: bool = False
    """mergekit writes another dtype than the config's (compared after casting)."""
    drop: tuple[str, ...] = ()
    """Keys removed, for a comparison of the rest of a refused example."""
    weights: bool = False
    """... and ``weight: 1.0`` given to each model (mergekit's nuslerp requires it)."""
    xfail: str = ""
    """Why that comparison does not hold yet (a feature still missing)."""


EXAMPLES: dict[str, Example] = {
    "arcee_fusion.yml": Example(
        "equal", "arcee_fusion, bfloat16, tiny Llama; mergekit writes float32 (its mask is a "
        "float32 tensor), mergeforge the config's bfloat16", dtype_note=True),
    "bio-merge.yml": Example("equal", "ties, float16, tiny Mistral"),
    "cabs.yml": Example(
        "refused", "a 'cabs' method config in another format (sources:, pruning_order:); not a "
        "mergekit 0.1.5 method", ("out_path",)),
    "chipalign.yml": Example(
        "refused", "nuslerp with 'geodesic: true' (no method of either tool has it: mergekit "
        "ignores it, mergeforge refuses it) and no per-model weight (mergekit requires it); "
        "without geodesic and with weights: equal, vocabulary union included",
        ("unknown parameter 'geodesic'",), drop=("geodesic",), weights=True,
        xfail="vocabulary union without a base model: mergekit starts from a random input's "
        "tokenizer (a set's order) and appends tokens in hash order, so its ids, and the "
        "embedding and head rows, change from run to run (every other tensor is equal); "
        "mergeforge's order is the config's"),
    "core_space.yml": Example(
        "refused", "method 'core_space' is not in mergekit 0.1.5 (and lists gpt2 twice)",
        ("is already listed as models[0]",)),
    "evo_bert_large.yml": Example(
        "refused", "a mergekit-evolve config (genome:, tasks:), not a merge: `mergeforge evolve` "
        "reads it", ("mergeforge evolve",)),
    "gpt2-small.yml": Example("equal", "passthrough of layers 0-8, float16, 12-layer tiny GPT-2"),
    "gradient-slerp.yml": Example("equal", "slerp with filtered gradients, 40 layers, float16"),
    "linear.yml": Example("equal", "linear, 3 models, float16"),
    "linear_small.yml": Example(
        "refused", "'metric_method:' (a metrics branch of mergekit, no merge_method)",
        ("metric_method",)),
    "lrp.yml": Example("refused", "method 'lrp' is not in mergekit 0.1.5", ("'lrp'",)),
    "mega.yml": Example("equal", "2-stage recipe (mergekit-multi): slerp, then ties of it"),
    "metrics-1.yml": Example("refused", "'metric_method:', no merge_method", ("metric_method",)),
    "metrics-llama-1v2.yml": Example(
        "refused", "'metric_method:', no merge_method", ("metric_method",)),
    "metrics-llama-codev2.yml": Example(
        "refused", "'metric_method:', no merge_method", ("metric_method",)),
    "metrics-small.yml": Example("refused", "'metric_method:', no merge_method",
                                 ("metric_method",)),
    "orcamini-platy-44layer.yml": Example("equal", "passthrough [0,24) + [20,40): 44 layers"),
    "ties.yml": Example("equal", "ties, gradients and a filter, float16"),
    "ties-192af12.yml": Example(
        "runs", "ranked_ties with density/weight gradients, bfloat16, tiny Phi; the method is on "
        "a 2024 mergekit branch only (no release: mergekit 0.1.5 refuses it)"),
    "vlm-linear.yml": Example(
        "equal", "linear on Qwen2-VL (3 modules), float32; hand-worked (the mean): mergekit "
        "0.1.5's qwen2_vl table reads config.num_hidden_layers, which transformers 5 moved to "
        "text_config, so mergekit fails here", oracle="hand"),
    "vlm-ties.yml": Example("equal", "ties with gradients on Florence-2 (5 layer stacks), float16"),
    "whisper-encoder-decoder-test.yml": Example(
        "refused", "method 'encoder_decoder_weighted' is not in mergekit 0.1.5",
        ("'encoder_decoder_weighted'",)),
    "whisper-encoder-decoder-weighted.yml": Example(
        "refused", "method 'encoder_decoder_weighted' is not in mergekit 0.1.5",
        ("'encoder_decoder_weighted'",)),
    "whisper-lora-multilingual.yml": Example(
        "refused", "'lora:' beside 'model:' (mergekit 0.1.5 drops it), one model twice, slerp "
        "without base_model", ("unknown key 'lora'",)),
    "whisper-merge-multilingual.yml": Example(
        "refused", "slerp without base_model and t", ("needs 'base_model:'",)),
    "zipit.yml": Example(
        "refused_by_mergeforge", "'align_weights: zipit' (mergekit 0.1.5 ignores it and runs "
        "plain ties); mergeforge names `mergeforge fuse`; without it: equal",
        ("align_weights", "mergeforge fuse"), drop=("align_weights",)),
}  # fmt: skip

FP16_CLOSE = 0.005
"""Largest share of elements (of all tensors) that may differ by more than 1e-2 between the two
tools when an example computes in float16 / bfloat16 (TIES top-k ties; rounding order)."""


def test_every_example_is_listed():
    files = sorted(p.name for p in DATA.glob("*.yml"))
    assert files == sorted(EXAMPLES)
    for f in files:
        assert (DATA / f).read_text().startswith("# source: github.com/arcee-ai/mergekit, ")


# ---- tiny checkpoints of each family ---------------------------------------------------------


def _family(root: Path, name: str, make, ids: list[str], *, scale: float = 0.02) -> dict[str, str]:
    """``make()`` saved under ``root/name-i`` once per id (float32), the first as is and the
    others with seeded noise of growing size on every floating tensor. float32, not the float16
    of the real checkpoints: in float16 many task-vector entries have equal magnitudes, and
    which of them TIES' top-k keeps at its threshold is arbitrary (mergekit's argsort)."""
    model = make()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {}
    for i, hub_id in enumerate(ids):
        g = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for k, p in model.state_dict().items():
                if p.is_floating_point() and i:
                    p.copy_(base[k] + torch.randn(p.shape, generator=g) * scale * i)
        d = root / f"{name}-{i}"
        model.save_pretrained(d, safe_serialization=True)
        out[hub_id] = str(d)
    return out


def _qwen2_vl(root: Path, ids: list[str]) -> dict[str, str]:
    """Qwen2-VL folders with the Hub checkpoint's names (``model.layers.*``, ``visual.*``):
    2 text layers, 2 vision blocks, the merger; config.json of Qwen2VLForConditionalGeneration."""
    out = {}
    for i, hub_id in enumerate(ids):
        g = torch.Generator().manual_seed(2000 + i)

        def r(*shape: int, g=g) -> torch.Tensor:
            return torch.randn(*shape, generator=g)

        t = {
            "model.embed_tokens.weight": r(64, 16),
            "model.norm.weight": r(16),
            "lm_head.weight": r(64, 16),
            "visual.patch_embed.proj.weight": r(8, 3, 2, 2, 2),
            "visual.merger.ln_q.weight": r(8),
            "visual.merger.ln_q.bias": r(8),
            "visual.merger.mlp.0.weight": r(32, 32),
            "visual.merger.mlp.0.bias": r(32),
            "visual.merger.mlp.2.weight": r(16, 32),
            "visual.merger.mlp.2.bias": r(16),
        }
        for n in range(2):
            p = f"model.layers.{n}."
            t |= {
                p + k: r(16) for k in ("input_layernorm.weight", "post_attention_layernorm.weight")
            }
            t |= {p + f"self_attn.{k}_proj.weight": r(16, 16) for k in "qkvo"}
            t |= {p + f"self_attn.{k}_proj.bias": r(16) for k in "qkv"}
            t |= {p + f"mlp.{k}_proj.weight": r(16, 16) for k in ("gate", "up", "down")}
            p = f"visual.blocks.{n}."
            t |= {p + f"{k}.{w}": r(8) for k in ("norm1", "norm2") for w in ("weight", "bias")}
            t |= {p + "attn.qkv.weight": r(24, 8), p + "attn.qkv.bias": r(24),
                  p + "attn.proj.weight": r(8, 8), p + "attn.proj.bias": r(8),
                  p + "mlp.fc1.weight": r(16, 8), p + "mlp.fc1.bias": r(16),
                  p + "mlp.fc2.weight": r(8, 16), p + "mlp.fc2.bias": r(8)}  # fmt: skip
        d = write_model(root / f"qwen2vl-{i}", t)
        (d / "config.json").write_text(json.dumps({
            "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
            "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 64,
            "vision_config": {"depth": 2, "embed_dim": 8, "hidden_size": 16, "num_heads": 2,
                              "mlp_ratio": 2, "patch_size": 2, "temporal_patch_size": 2,
                              "spatial_merge_size": 2, "in_channels": 3},
            "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
            "torch_dtype": "float32",
        }))  # fmt: skip
        out[hub_id] = str(d)
    return out


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict[str, str]:
    """Every model id of the examples -> a tiny local checkpoint of its family."""
    import transformers as tf

    root = tmp_path_factory.mktemp("examples")

    def llama(layers: int):
        def make():
            torch.manual_seed(0)
            return tf.LlamaForCausalLM(tf.LlamaConfig(
                hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
                max_position_embeddings=32, tie_word_embeddings=False))  # fmt: skip

        return make

    def mistral():
        torch.manual_seed(1)
        return tf.MistralForCausalLM(tf.MistralConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=64, max_position_embeddings=32))  # fmt: skip

    def gpt2():
        torch.manual_seed(2)
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=16, n_layer=12, n_head=2, vocab_size=64,
                                                n_positions=32, bos_token_id=0,
                                                eos_token_id=0))  # fmt: skip

    def florence2():
        torch.manual_seed(3)
        return tf.Florence2ForConditionalGeneration(tf.Florence2Config(
            text_config=dict(vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=2,
                             encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
                             decoder_attention_heads=2, max_position_embeddings=64),
            vision_config=dict(depths=[1, 1, 1, 1], embed_dim=[8, 8, 16, 16],
                               num_heads=[1, 1, 2, 2], num_groups=[1, 1, 2, 2],
                               projection_dim=16, window_size=2)))  # fmt: skip

    def whisper():
        torch.manual_seed(4)
        return tf.WhisperForConditionalGeneration(tf.WhisperConfig(
            d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=64,
            num_mel_bins=8, max_source_positions=16, max_target_positions=16, pad_token_id=1,
            bos_token_id=2, eos_token_id=2, decoder_start_token_id=3,
            suppress_tokens=[], begin_suppress_tokens=[]))  # fmt: skip

    def phi():
        torch.manual_seed(5)
        return tf.PhiForCausalLM(tf.PhiConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
            vocab_size=64, max_position_embeddings=32))  # fmt: skip

    hub: dict[str, str] = {}
    hub |= _family(root, "llama40", llama(40), [
        "TheBloke/Llama-2-13B-fp16", "psmathur/orca_mini_v3_13b", "garage-bAInd/Platypus2-13B",
        "WizardLM/WizardMath-13B-V1.0", "WizardLM/WizardLM-13B-V1.2",
        "TinyLlama/TinyLlama-1.1B-Chat-v1.0"])  # fmt: skip
    hub |= _family(root, "llama3", llama(3), [
        "model_a", "model_b", "instruction_model_path", "chip_model_path",
        "huggyllama/llama-7b", "TheBloke/Llama-2-7B-fp16", "meta-llama/CodeLlama-7b-Python-hf",
        "meta-llama/Llama-2-7b-hf", "BEE-spoke-data/smol_llama-220M-GQA",
        "BEE-spoke-data/smol_llama-220M-openhermes"])  # fmt: skip
    hub |= _family(root, "mistral", mistral, [
        "mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-Instruct-v0.2",
        "BioMistral/BioMistral-7B", "/home/yangzz/models_test/Mistral-7b-v0.1/",
        "/home/yangzz/models_test/zephyr-7b-alpha/", "/home/yangzz/models_test/zephyr-7b-beta/",
    ])  # fmt: skip
    hub |= _family(root, "gpt2", gpt2, ["gpt2"])
    hub |= _family(root, "florence2", florence2,
                   ["microsoft/Florence-2-base", "maxiw/Florence-2-ScreenQA-base"])  # fmt: skip
    hub |= _family(root, "whisper", whisper, [
        "openai/whisper-large-v2", "user/whisper-french", "user/whisper-specialized",
        "user/whisper-specialized-french"])  # fmt: skip
    hub |= _qwen2_vl(root, ["Qwen/Qwen2-VL-7B-Instruct", "impactframes/Qwen2-VL-7B-Captioner"])
    hub |= _family(root, "phi", phi, [
        "microsoft/phi-2", "abacaj/phi-2-super", "rhysjones/phi-2-orange-v2",
        "mobiuslabsgmbh/aanaphi2-v0.1"])  # fmt: skip
    _chipalign_tokenizers(hub)
    return hub


def _chipalign_tokenizers(hub: dict[str, str]) -> None:
    """chipalign's vocabulary union needs tokenizers: two that share most words (64 rows)."""
    from tests.helpers import tiny_tokenizer

    words = [f"w{i}" for i in range(70)]
    tiny_tokenizer(words[:60]).save_pretrained(hub["instruction_model_path"])
    tiny_tokenizer(words[3:63]).save_pretrained(hub["chip_model_path"])


# ---- running both tools ----------------------------------------------------------------------


def _docs(name: str) -> list:
    return [d for d in yaml.safe_load_all((DATA / name).read_text()) if d is not None]


def _rewrite(value, hub: dict[str, str]):
    """Every string that is a model id of ``hub`` replaced by its local folder."""
    if isinstance(value, dict):
        return {k: _rewrite(v, hub) for k, v in value.items()}
    if isinstance(value, list):
        return [_rewrite(v, hub) for v in value]
    if isinstance(value, str) and value.strip() in hub:
        return hub[value.strip()]
    return value


def _write(path: Path, docs: list) -> Path:
    path.write_text("\n---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs))
    return path


def _mergeforge(recipe: Path, out: Path, capsys) -> tuple[int, str]:
    code = main(["merge", str(recipe), str(out), "--no-progress", "--no-copy-tokenizer"])
    return code, capsys.readouterr().err


def _mergekit(docs: list, out: Path) -> dict[str, torch.Tensor]:
    if len(docs) == 1:
        return run_mergekit(docs[0], out)
    recipe = _write(out.with_suffix(".yml"), docs)
    done = subprocess.run(
        ["mergekit-multi", str(recipe), "-I", str(out.with_name(out.name + "-stages")),
         "--out-path", str(out), "--no-copy-tokenizer", "--quiet", "--random-seed", "0"],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    if not out.exists():  # every document named: the final one is the stage nobody uses
        final = [d["name"] for d in docs if not any(
            d["name"] in json.dumps(o) for o in docs if o is not d)]  # fmt: skip
        out = out.with_name(out.name + "-stages") / final[0]
    return load_dir(out)


def _compare(ours: dict, theirs: dict, *, exact: bool, cast: bool = False) -> float:
    """Max abs difference (``exact``), else the share of elements differing by more than 1e-2
    (``cast``: theirs cast to our dtypes first)."""
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))[:5]
    if cast:
        theirs = {k: v.to(ours[k].dtype) for k, v in theirs.items()}
    for k in ours:
        assert ours[k].shape == theirs[k].shape and ours[k].dtype == theirs[k].dtype, k
    if exact:
        return max((ours[k].double() - theirs[k].double()).abs().max().item() for k in ours)
    off = sum(int(((ours[k].double() - theirs[k].double()).abs() > 1e-2).sum()) for k in ours)
    return off / sum(t.numel() for t in ours.values())


def _with_dtype(docs: list, dtype: str) -> list:
    return [{**d, "dtype": dtype} for d in docs]


@pytest.mark.mergekit
@pytest.mark.parametrize("name", [n for n, e in EXAMPLES.items() if e.outcome == "equal"])
def test_example_runs_and_equals_mergekit(name, hub, tmp_path, capsys):
    docs = _rewrite(_docs(name), hub)
    code, err = _mergeforge(_write(tmp_path / name, docs), tmp_path / "mf", capsys)
    assert code == 0, err
    ours, ex = load_dir(tmp_path / "mf"), EXAMPLES[name]
    if ex.oracle == "hand":  # vlm-linear: linear, weights 1 and 1, normalized: the mean
        a, b = (load_dir(Path(m["model"])) for m in docs[0]["models"])
        assert set(ours) == set(a)
        assert max((ours[k] - (a[k] + b[k]) / 2).abs().max().item() for k in a) <= 1e-6
        with pytest.raises(RuntimeError, match="num_hidden_layers"):
            _mergekit(docs, tmp_path / "mk")
        return
    theirs = _mergekit(docs, tmp_path / "mk")
    low = {d.get("dtype") for d in docs} & {"float16", "bfloat16", "fp16", "bf16"}
    if not low:
        assert _compare(ours, theirs, exact=True) <= 1e-6
        return
    assert _compare(ours, theirs, exact=False, cast=ex.dtype_note) <= FP16_CLOSE
    # the strict oracle: the same recipe computed in float32
    f32 = _with_dtype(docs, "float32")
    code, err = _mergeforge(_write(tmp_path / f"f32-{name}", f32), tmp_path / "mf32", capsys)
    assert code == 0, err
    assert _compare(load_dir(tmp_path / "mf32"), _mergekit(f32, tmp_path / "mk32"),
                    exact=True) <= 1e-6  # fmt: skip


@pytest.mark.mergekit
@pytest.mark.parametrize("name", [n for n, e in EXAMPLES.items() if e.outcome == "refused"])
def test_example_refused_by_both(name, hub, tmp_path, capsys):
    docs = _rewrite(_docs(name), hub)
    code, err = _mergeforge(_write(tmp_path / name, docs), tmp_path / "mf", capsys)
    assert code != 0 and err.startswith("error: ") and "Traceback" not in err, err
    for needle in EXAMPLES[name].needles:
        assert needle in err, err
    assert not (tmp_path / "mf").exists()
    with pytest.raises(Exception):  # noqa: B017 - pydantic, RuntimeError, KeyError, ...
        _mergekit(docs, tmp_path / "mk")


@pytest.mark.mergekit
@pytest.mark.parametrize(
    "name", [n for n, e in EXAMPLES.items() if e.outcome == "refused_by_mergeforge"]
)
def test_example_refused_on_purpose(name, hub, tmp_path, capsys):
    """mergekit runs these, silently dropping a key; mergeforge names it and the alternative."""
    docs = _rewrite(_docs(name), hub)
    code, err = _mergeforge(_write(tmp_path / name, docs), tmp_path / "mf", capsys)
    assert code != 0 and err.startswith("error: ") and "Traceback" not in err, err
    for needle in EXAMPLES[name].needles:
        assert needle in err, err
    assert not (tmp_path / "mf").exists()
    _mergekit(docs, tmp_path / "mk")  # mergekit runs it


@pytest.mark.mergekit
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(reason=e.xfail, strict=False)) if e.xfail else n
    for n, e in EXAMPLES.items() if e.drop
])  # fmt: skip
def test_refused_example_without_the_key_equals_mergekit(name, hub, tmp_path, capsys):
    """The rest of an example refused for one key: without it both give the same tensors."""
    ex = EXAMPLES[name]

    def drop(d):
        if isinstance(d, dict):
            return {k: drop(v) for k, v in d.items() if k not in ex.drop}
        return d

    kept = [drop(d) for d in _rewrite(_docs(name), hub)]
    if ex.weights:
        for d in kept:
            d["models"] = [{**m, "parameters": {"weight": 1.0}} for m in d["models"]]
    code, err = _mergeforge(_write(tmp_path / f"kept-{name}", kept), tmp_path / "mf", capsys)
    assert code == 0, err
    ours, theirs = load_dir(tmp_path / "mf"), _mergekit(kept, tmp_path / "mk")
    low = {d.get("dtype") for d in kept} & {"float16", "bfloat16"}
    assert _compare(ours, theirs, exact=not low) <= (FP16_CLOSE if low else 1e-6)


@pytest.mark.parametrize("name", [n for n, e in EXAMPLES.items() if e.outcome == "runs"])
def test_example_runs(name, hub, tmp_path, capsys):
    """Runs, keeps every tensor's name and shape, writes the config's dtype, and loads with
    transformers; each tensor moved off the base (the task vectors are not all dropped)."""
    import transformers as tf

    docs = _rewrite(_docs(name), hub)
    code, err = _mergeforge(_write(tmp_path / name, docs), tmp_path / "mf", capsys)
    assert code == 0, err
    ours, base = load_dir(tmp_path / "mf"), load_dir(Path(docs[0]["base_model"]))
    assert set(ours) == set(base)
    for k, t in ours.items():
        assert t.shape == base[k].shape and t.dtype == torch.bfloat16, k
        assert bool(torch.isfinite(t.float()).all()), k
    moved = [
        k
        for k in ours
        if ours[k].numel() > 1 and not torch.equal(ours[k].float(), base[k].bfloat16().float())
    ]
    assert len(moved) >= len(ours) // 2
    tf.AutoModelForCausalLM.from_pretrained(tmp_path / "mf")
