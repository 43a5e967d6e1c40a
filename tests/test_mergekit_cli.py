"""mergekit's command line: every mergekit-yaml option (read from mergekit's own click command)
is accepted by ``mergeforge merge`` with the value mergekit gives it, and ``mergeforge-yaml``
run with mergekit-yaml's arguments writes what mergekit-yaml writes. Those comparisons carry
``@pytest.mark.mergekit`` (skipped without mergekit); the rest check mergeforge-yaml alone."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
from importlib.metadata import entry_points
from pathlib import Path

import click
import pytest
import torch
import yaml

from mergeforge.cli import build_parser, main, yaml_main
from mergeforge.config import parse_size
from mergeforge.errors import ConfigError
from mergeforge.mergekit_cli import parse_kmb
from tests.helpers import load_dir, mergekit_configs, mergekit_missing

# mergekit-yaml's click command: its options are the parameter list of the tests below
mk_yaml = None if mergekit_missing() else importlib.import_module("mergekit.scripts.run_yaml")

TOKENIZER_FILES = {
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "merges.txt",
    "vocab.txt",
}


def _option_argvs() -> list[tuple[str, list[str]]]:
    """(param name, tokens) for every spelling of every mergekit-yaml option, with a value
    for the options that take one."""
    values = {click.INT: "3", click.STRING: "somewhere"}
    out = []
    for p in mk_yaml.main.params:
        if not isinstance(p, click.Option):
            continue
        takes_value = not p.is_flag and not p.count
        for form in [*p.opts, *p.secondary_opts]:
            value = values.get(p.type, "20K")  # the one custom type is the shard size
            out.append((p.name, [form, value] if takes_value else [form]))
    return out


OPTION_ARGVS = _option_argvs() if mk_yaml is not None else []


@pytest.mark.mergekit
def test_mergekit_has_the_options_we_expect():
    """Guards the test below from passing on an empty list (mergekit 0.1.5: 26 options)."""
    names = {n for n, _ in OPTION_ARGVS}
    assert len(names) >= 24 and {"cuda", "copy_tokenizer", "out_shard_size", "gpu_rich"} <= names
    assert len(OPTION_ARGVS) >= 39  # 14 booleans as --x and --no-x, 11 other spellings


@pytest.mark.mergekit
@pytest.mark.parametrize(
    ("name", "tokens"),
    OPTION_ARGVS or [pytest.param(None, None, id="mergekit-yaml's options")],
    ids=[" ".join(t) for _, t in OPTION_ARGVS] or None,
)
def test_every_mergekit_yaml_option_parses_to_mergekit_value(name, tokens):
    theirs = mk_yaml.main.make_context("mergekit-yaml", ["c.yml", "out", *tokens]).params[name]
    args = build_parser().parse_args(["merge", "c.yml", "out", *tokens])
    ours = getattr(args, name)
    if name == "out_shard_size":
        ours = parse_kmb(ours)
    assert ours == theirs, (tokens, ours, theirs)


@pytest.mark.mergekit
@pytest.mark.parametrize("value", ["5B", "500M", "20K", "1000", "2b", "7k"])
def test_out_shard_size_is_mergekit_parse_kmb(value):
    from mergekit.common import parse_kmb as mk_parse_kmb

    assert parse_kmb(value) == mk_parse_kmb(value)


def test_out_shard_size_5b_is_five_billion_bytes_not_five():
    assert parse_kmb("5B") == 5_000_000_000 != parse_size("5B", "x")  # why it has its own parser
    assert parse_kmb("5GB") == 5_000_000_000 and parse_kmb("1.5B") == 1_500_000_000
    with pytest.raises(ConfigError, match="--out-shard-size: '5X' is not a size"):
        parse_kmb("5X")


def _family_yaml(tmp_path: Path, cfg: dict) -> Path:
    p = tmp_path / "merge.yml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def _run_mergekit_yaml(argv: list[str]) -> None:
    mk_yaml.main.main(args=argv, standalone_mode=False)


MK_FLAGS = [
    "--copy-tokenizer",
    "--allow-crimes",
    "--lazy-unpickle",
    "--trust-remote-code",
    "--out-shard-size",
    "40K",
    "--random-seed",
    "0",
    "--quiet",
]


@pytest.mark.mergekit
@pytest.mark.parametrize("method", ["linear", "ties", "slerp"])
def test_mergeforge_yaml_writes_what_mergekit_yaml_writes(llama_family, tmp_path, capsys, method):
    cfg = _family_yaml(tmp_path, mergekit_configs(llama_family)[method])
    _run_mergekit_yaml([str(cfg), str(tmp_path / "mk"), *MK_FLAGS])
    capsys.readouterr()
    assert yaml_main([str(cfg), str(tmp_path / "mf"), *MK_FLAGS]) == 0
    out, err = capsys.readouterr()
    theirs, ours = load_dir(tmp_path / "mk"), load_dir(tmp_path / "mf")
    assert set(theirs) <= set(ours) and len(theirs) >= 0.9 * len(ours)
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in theirs)
    assert worst <= 1e-6, worst
    # --out-shard-size 40K: the same 40,000-byte budget (mergekit: bytes, despite its help)
    n_shards = [len(list((tmp_path / d).glob("*.safetensors"))) for d in ("mk", "mf")]
    assert n_shards[0] == n_shards[1] > 1
    # one note per accepted-without-effect flag, nothing else; --quiet: no summary line
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert sorted(n.split()[1] for n in notes) == [
        "--allow-crimes",
        "--lazy-unpickle",
        "--trust-remote-code",
    ], notes
    assert out == ""


def test_mergeforge_yaml_runs_twice_into_the_same_folder(llama_family, tmp_path, capsys):
    """A script that re-runs mergekit-yaml into its output folder keeps working: the previous
    mergeforge output is replaced; a folder that is not one is still refused."""
    cfg = _family_yaml(tmp_path, mergekit_configs(llama_family)["linear"])
    out = tmp_path / "out"
    assert yaml_main([str(cfg), str(out), "--quiet"]) == 0
    first = load_dir(out)
    assert yaml_main([str(cfg), str(out), "--quiet"]) == 0
    assert all(torch.equal(first[k], v) for k, v in load_dir(out).items())
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert yaml_main([str(cfg), str(other), "--quiet"]) == 2
    assert "not a previous mergeforge output" in capsys.readouterr().err
    assert (other / "keep.txt").read_text() == "mine"
    (out / "model-q4.gguf").write_text("quantized")  # added to the previous output
    assert yaml_main([str(cfg), str(out), "--quiet"]) == 2
    assert "holds files a merge did not write: model-q4.gguf;" in capsys.readouterr().err
    assert (out / "model-q4.gguf").read_text() == "quantized"


def _with_tokenizer(src: Path, dst: Path) -> Path:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    shutil.copytree(src, dst)
    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(20)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(dst)
    return dst


@pytest.mark.mergekit
@pytest.mark.parametrize(
    "flags", [["--copy-tokenizer"], ["--no-copy-tokenizer", "--no-write-model-card"]]
)
def test_tokenizer_and_card_flags_as_mergekit(llama_family, tmp_path, capsys, flags):
    # both models carry the tokenizer: without a base, mergekit's donor is either (a set)
    m0 = _with_tokenizer(llama_family["experts"][0], tmp_path / "m0")
    m1 = _with_tokenizer(llama_family["experts"][1], tmp_path / "m1")
    cfg = _family_yaml(
        tmp_path,
        {
            "merge_method": "linear",
            "dtype": "float32",
            "models": [
                {"model": str(m0), "parameters": {"weight": 0.5}},
                {"model": str(m1), "parameters": {"weight": 0.5}},
            ],
        },
    )
    _run_mergekit_yaml([str(cfg), str(tmp_path / "mk"), "--quiet", *flags])
    assert yaml_main([str(cfg), str(tmp_path / "mf"), "--quiet", *flags]) == 0
    theirs, ours = (set(os.listdir(tmp_path / d)) for d in ("mk", "mf"))
    assert theirs & TOKENIZER_FILES == ours & TOKENIZER_FILES
    assert bool(ours & TOKENIZER_FILES) == ("--copy-tokenizer" in flags)
    assert (
        ("README.md" in theirs) == ("README.md" in ours) == ("--no-write-model-card" not in flags)
    )
    assert "mergeforge_config.yml" in ours  # provenance (and what --overwrite recognises) stays


def test_random_seed_overrides_the_config_seed(llama_family, tmp_path):
    base = str(llama_family["base"])
    cfg = {
        "merge_method": "dare_linear",
        "base_model": base,
        "dtype": "float32",
        "seed": 1,
        "models": [
            {
                "model": str(llama_family["experts"][0]),
                "parameters": {"weight": 1.0, "density": 0.5},
            }
        ],
    }
    a = _family_yaml(tmp_path, cfg)
    assert main(["merge", str(a), str(tmp_path / "a"), "--quiet", "--random-seed", "7"]) == 0
    (tmp_path / "b").mkdir()
    b = _family_yaml(tmp_path / "b", {**cfg, "seed": 7})
    assert main(["merge", str(b), str(tmp_path / "b" / "out"), "--quiet"]) == 0
    assert main(["merge", str(a), str(tmp_path / "c"), "--quiet"]) == 0  # the config's seed 1
    ta, tb, tc = (load_dir(p) for p in (tmp_path / "a", tmp_path / "b" / "out", tmp_path / "c"))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not all(torch.equal(ta[k], tc[k]) for k in ta)


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--unsafe-truncate-embeddings"], "--unsafe-truncate-embeddings is not supported"),
        (["--shard-size", "1GB", "--out-shard-size", "1B"], "give one of --shard-size"),
        (["--out-shard-size", "lots"], "--out-shard-size: 'lots' is not a size"),
        (["--num-threads", "0"], "--num-threads: expected a positive count"),
        pytest.param(
            ["--cuda"],
            "no CUDA GPU",
            marks=pytest.mark.skipif(
                torch.cuda.is_available(), reason="--cuda merges when there is a GPU"
            ),
        ),
    ],
)
def test_flags_that_cannot_be_honoured_are_clear_errors(
    llama_family, tmp_path, capsys, flags, needle
):
    cfg = _family_yaml(tmp_path, mergekit_configs(llama_family)["linear"])
    assert yaml_main([str(cfg), str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_no_safe_serialization_notes_that_the_output_is_safetensors(llama_family, tmp_path, capsys):
    cfg = _family_yaml(tmp_path, mergekit_configs(llama_family)["linear"])
    assert yaml_main([str(cfg), str(tmp_path / "out"), "--no-safe-serialization", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "note: --no-safe-serialization is accepted" in err and "safetensors" in err
    assert list((tmp_path / "out").glob("*.safetensors")) and not list(
        (tmp_path / "out").glob("*.bin")
    )


def test_console_script_mergeforge_yaml(llama_family, tmp_path):
    """The installed ``mergeforge-yaml`` script, run as a script would run mergekit-yaml."""
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "mergeforge-yaml"]
    assert ep.value == "mergeforge.cli:run_yaml"
    exe = shutil.which("mergeforge-yaml") or pytest.fail("mergeforge-yaml is not on PATH")
    cfg = _family_yaml(tmp_path, mergekit_configs(llama_family)["linear"])
    proc = subprocess.run(
        [exe, str(cfg), str(tmp_path / "out"), "-v", "--lazy-unpickle"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "note: --lazy-unpickle" in proc.stderr and "wrote" in proc.stdout
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["weight_map"]
