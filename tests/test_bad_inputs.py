"""Bad input through the CLI: a clear error naming the file/tensor, non-zero exit, and nothing
left at the output path. Plus SIGKILL half-way through a real merge."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mergeforge.cli import main
from tests.helpers import finish, layer_family, merge_argv, start_blocked, written_fraction


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _yaml(tmp: Path, cfg: dict) -> Path:
    p = tmp / "merge.yml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _ta(base, experts, **extra) -> dict:
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(e), "parameters": {"weight": 0.5}} for e in experts],
    }
    cfg.update(extra)
    return cfg


def _fails(tmp: Path, cfg: dict, capsys, *needles: str) -> str:
    out = tmp / "out"
    code = main(["merge", str(_yaml(tmp, cfg)), str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0
    assert not out.exists(), "a failed merge left something at the output path"
    assert not [p for p in tmp.iterdir() if "partial" in p.name], "temp folder left behind"
    for n in needles:
        assert n in err, f"{n!r} not in error message: {err}"
    return err


def _rewrite(folder: Path, fn) -> None:
    f = folder / "model.safetensors"
    sd = load_file(f)
    fn(sd)
    save_file(sd, f, metadata={"format": "pt"})


def test_ok_baseline(llama_family, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["merge", str(_yaml(tmp_path, _ta(llama_family["base"],
                llama_family["experts"]))), str(out), "--no-progress"]) == 0  # fmt: skip
    assert (out / "model.safetensors.index.json").is_file()
    assert (out / "config.json").is_file() and (out / "README.md").is_file()
    assert (out / "mergeforge_config.yml").is_file()


def test_truncated_safetensors(llama_family, tmp_path, capsys):
    bad = _copy(llama_family["experts"][0], tmp_path / "trunc")
    f = bad / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    _fails(tmp_path, _ta(llama_family["base"], [bad]), capsys, "model.safetensors")


def test_wrong_shape_tensor(llama_family, tmp_path, capsys):
    bad = _copy(llama_family["experts"][0], tmp_path / "shape")
    _rewrite(bad, lambda sd: sd.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(64, 31)}))
    _fails(tmp_path, _ta(llama_family["base"], [bad]), capsys,
           "model.layers.1.mlp.up_proj.weight", str(bad), "shape")  # fmt: skip


def test_missing_tensor(llama_family, tmp_path, capsys):
    bad = _copy(llama_family["experts"][0], tmp_path / "missing")
    _rewrite(bad, lambda sd: sd.pop("model.layers.2.self_attn.k_proj.weight"))
    _fails(tmp_path, _ta(llama_family["base"], [bad]), capsys,
           "model.layers.2.self_attn.k_proj.weight", str(bad), "missing")  # fmt: skip


def test_mismatched_vocabulary(llama_family, tmp_path, capsys):
    bad = _copy(llama_family["experts"][0], tmp_path / "vocab")
    cfg = yaml.safe_load((bad / "config.json").read_text())
    cfg["vocab_size"] = 129
    (bad / "config.json").write_text(yaml.safe_dump(cfg))
    _fails(tmp_path, _ta(llama_family["base"], [bad]), capsys, "vocab", str(bad))


def test_nan_tensor(llama_family, tmp_path, capsys):
    bad = _copy(llama_family["experts"][1], tmp_path / "nan")

    def poison(sd):
        t = sd["model.layers.0.mlp.down_proj.weight"]
        t[0, 0] = float("nan")

    _rewrite(bad, poison)
    _fails(tmp_path, _ta(llama_family["base"], [llama_family["experts"][0], bad]), capsys,
           "model.layers.0.mlp.down_proj.weight", str(bad), "NaN")  # fmt: skip


def test_unknown_method(llama_family, tmp_path, capsys):
    cfg = _ta(llama_family["base"], llama_family["experts"])
    cfg["merge_method"] = "tie"
    _fails(tmp_path, cfg, capsys, "unknown merge method 'tie'", "ties")


def test_unknown_parameter(llama_family, tmp_path, capsys):
    cfg = _ta(llama_family["base"], llama_family["experts"])
    cfg["models"][1]["parameters"]["wieght"] = 0.3
    _fails(tmp_path, cfg, capsys, "models[1].parameters", "'wieght'", "Did you mean 'weight'")


def test_missing_path(llama_family, tmp_path, capsys):
    _fails(tmp_path, _ta(llama_family["base"], [tmp_path / "nope"]), capsys,
           str(tmp_path / "nope"))  # fmt: skip


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_bin_that_runs_code_is_refused(llama_family, tmp_path, capsys):
    bad = tmp_path / "evil"
    bad.mkdir()
    marker = tmp_path / "PWNED"
    evil = _Evil()
    evil.marker = marker
    torch.save({"model.embed_tokens.weight": evil}, bad / "pytorch_model.bin")
    shutil.copy(Path(llama_family["base"]) / "config.json", bad / "config.json")
    _fails(tmp_path, _ta(llama_family["base"], [bad]), capsys, "pytorch_model.bin")
    assert not marker.exists(), "the pickle's code was executed"


@pytest.mark.skipif(sys.platform != "linux", reason="uses /proc and Linux pipes")
def test_sigkill_halfway_leaves_nothing(tmp_path):
    """A real merge (20 tensors of 64x64) is SIGKILLed half-way: no output folder appears;
    the next run removes the killed run's partial folder and succeeds.

    Half-way without a timer: the child blocks on its first progress line, written after >= 10%
    of the tensors (tests/helpers.py: start_blocked); with at most workers + 1 tensors in flight
    some but not all of the shard bytes are then on disk."""
    dirs = layer_family(tmp_path, n=20, dim=64)
    cfg = _yaml(tmp_path, {"merge_method": "ties", "base_model": str(dirs[0]),
                           "models": [{"model": str(dirs[1])}, {"model": str(dirs[2])}],
                           "parameters": {"density": 0.5}})  # fmt: skip
    out = tmp_path / "out"
    proc, r, filled = start_blocked(merge_argv(cfg, out))
    partial = tmp_path / f".out.mergeforge-partial-{proc.pid}"
    frac = written_fraction(partial, 20 * 64 * 64 * 4)
    assert 0.05 < frac < 0.9, f"not half-way: {frac:.0%} of the shard bytes written"
    proc.send_signal(signal.SIGKILL)
    finish(proc, r, filled)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and partial.is_dir()  # SIGKILL cannot clean up: the next run does
    # the next run cleans the stale partial folder and succeeds
    assert main(["merge", str(cfg), str(out), "--no-progress"]) == 0
    assert out.is_dir()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_bad_exclude_is_refused_before_any_work():
    """A merge config's ``exclude:`` and a bench entry's share one check."""
    from mergeforge.config import load_config
    from mergeforge.errors import ConfigError

    ok = {"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}]}
    assert load_config({**ok, "exclude": "bias"}).exclude == ("bias",)
    assert load_config({**ok, "exclude": ["bias", "norm"]}).exclude == ("bias", "norm")
    assert load_config(ok).exclude == ()
    for bad, match in (("(oops", "config: exclude: '\\(oops' is not a valid regex"),
                       ({"a": 1}, "a regex or a list of regexes"),
                       ([1], "a regex or a list of regexes")):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            load_config({**ok, "exclude": bad})
