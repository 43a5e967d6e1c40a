"""Bad input through the CLI: a clear error naming the file/tensor, non-zero exit, and nothing
left at the output path. Plus SIGKILL half-way through a real merge."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from mergeforge.cli import main


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


def test_sigkill_halfway_leaves_nothing(tmp_path):
    """A real merge of ~100 MB is killed mid-way: no output folder appears."""
    src = tmp_path / "big"
    src.mkdir()
    g = torch.Generator().manual_seed(0)
    for name in ("base", "e1", "e2"):
        d = src / name
        d.mkdir()
        sd = {f"model.layers.{i}.mlp.weight": torch.randn(1024, 1024, generator=g)
              for i in range(24)}  # fmt: skip
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    cfg = _yaml(tmp_path, {"merge_method": "ties", "base_model": str(src / "base"),
                           "models": [{"model": str(src / "e1")}, {"model": str(src / "e2")}],
                           "parameters": {"density": 0.5}})  # fmt: skip
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mergeforge.cli", "merge", str(cfg), str(out), "--no-progress"],
        stderr=subprocess.PIPE,
    )
    # wait until the writer has started (its hidden partial folder exists), then kill
    deadline = time.time() + 60
    while time.time() < deadline and not [p for p in tmp_path.iterdir() if "partial" in p.name]:
        time.sleep(0.02)
    assert [p for p in tmp_path.iterdir() if "partial" in p.name], "merge never started writing"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    # the next run cleans the stale partial folder and succeeds
    assert main(["merge", str(cfg), str(out), "--no-progress"]) == 0
    assert out.is_dir()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_bad_exclude_is_refused_before_any_work():
    """A merge config's ``exclude:`` and a bench entry's share one check."""
    import pytest

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
