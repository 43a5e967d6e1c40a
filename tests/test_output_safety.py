"""Inputs are sacred, and only mergeforge's own outputs are replaced (issue 12, items 1-2).

Through the CLI (``mergeforge.cli.main``, exit code 2, no traceback) and the Python API: an
output that is, lies inside or contains an input (model, base, LoRA adapter, statistics file;
through a symlink or a relative path) is refused with and without ``--overwrite``, and every
input file is bit-identical afterwards. ``--overwrite`` replaces a previous mergeforge output or
an empty folder, never another folder. An unwritable output location is a clear error before
any tensor is read: a file as parent, an immutable folder (root), a folder of another user (run
as ``nobody``), a read-only file system, no free inodes; and a full disk ends cleanly.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import mergeforge
from mergeforge.checkpoint.sidecar import save_sidecar, sidecar_dir
from mergeforge.cli import main
from mergeforge.errors import ConfigError
from tests.helpers import load_dir, sha_tree


def _leftovers(root: Path) -> list[Path]:
    """Hidden staging/probe/old folders anywhere under ``root``."""
    return [p for p in root.rglob(".*mergeforge-*")]


def _yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _ta(base, models, weight: float = 0.5) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": weight}} for m in models],
    }


def _cli(cfg: Path, out, *flags: str, capsys) -> tuple[int, str]:
    code = main(["merge", str(cfg), str(out), "--no-progress", *flags])
    return code, capsys.readouterr().err


@pytest.fixture
def models(llama_family, tmp_path) -> Path:
    """Copies of the llama base and two experts under ``tmp_path/models`` (the cases below try
    to destroy them), plus ``merged``: a previous mergeforge output used as an input."""
    root = tmp_path / "models"
    root.mkdir()
    shutil.copytree(llama_family["base"], root / "base")
    for i in (0, 1):
        shutil.copytree(llama_family["experts"][i], root / f"expert{i}")
    cfg = _yaml(tmp_path / "first.yml", _ta(root / "base", [root / "expert0", root / "expert1"]))
    assert main(["merge", str(cfg), str(root / "merged"), "--no-progress"]) == 0
    return root


def _refused(models: Path, cfg: Path, out, capsys, *needles: str) -> None:
    """``out`` is refused with and without --overwrite, naming it and ``needles``; nothing
    under the tmp folder changes and no hidden folder is left."""
    tmp = models.parent
    before = sha_tree(tmp)
    existed = Path(out).exists()
    for flags in ((), ("--overwrite",)):
        code, err = _cli(cfg, out, *flags, capsys=capsys)
        assert code == 2, err
        assert err.startswith("error: ") and "Traceback" not in err
        for n in (str(out), *needles):
            assert n in err, f"{n!r} not in: {err}"
        assert sha_tree(tmp) == before, "an input changed"
        assert Path(out).exists() == existed
        assert _leftovers(tmp) == []


def test_output_is_an_input_that_is_a_previous_output(models, tmp_path, capsys):
    """The issue's case: ``merge cfg.yml ./expert`` where ``./expert`` is an input (here one
    --overwrite would otherwise accept: a previous mergeforge output)."""
    cfg = _yaml(tmp_path / "m.yml", _ta(models / "base", [models / "merged", models / "expert1"]))
    _refused(models, cfg, models / "merged", capsys, "is the input", str(models / "merged"))


def test_output_is_the_base(models, tmp_path, capsys):
    cfg = _yaml(tmp_path / "m.yml", _ta(models / "base", [models / "expert0", models / "expert1"]))
    _refused(models, cfg, models / "base", capsys, "is the input", str(models / "base"))


def test_output_inside_an_input(models, tmp_path, capsys):
    cfg = _yaml(tmp_path / "m.yml", _ta(models / "base", [models / "expert0", models / "expert1"]))
    _refused(models, cfg, models / "expert1" / "sub" / "out", capsys, "lies inside the input",
             str(models / "expert1"))  # fmt: skip


def test_output_contains_an_input(models, tmp_path, capsys):
    cfg = _yaml(tmp_path / "m.yml", _ta(models / "base", [models / "expert0", models / "expert1"]))
    _refused(models, cfg, models, capsys, "contains the input")


def test_output_is_an_input_through_a_symlink_and_a_relative_path(
    models, tmp_path, capsys, monkeypatch
):
    cfg = _yaml(tmp_path / "m.yml", _ta(models / "base", [models / "merged", models / "expert1"]))
    (tmp_path / "link").symlink_to(models / "merged", target_is_directory=True)
    _refused(models, cfg, tmp_path / "link", capsys, "is the input", str(models / "merged"))
    (tmp_path / "dirlink").symlink_to(models, target_is_directory=True)
    _refused(models, cfg, tmp_path / "dirlink" / "expert1" / "x", capsys, "lies inside the input")
    monkeypatch.chdir(models / "expert0")
    _refused(models, cfg, Path("..") / "merged", capsys, "is the input")


def test_output_is_where_a_symlinked_weights_file_lives(models, tmp_path, capsys):
    """The Hugging Face cache layout in small: the model folder holds a symlink into a
    ``blobs/`` folder elsewhere. Writing into ``blobs/`` would replace the weights."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    weights = models / "expert1" / "model.safetensors"
    weights.rename(blobs / "0123abcd")
    weights.symlink_to(blobs / "0123abcd")
    cfg = _yaml(tmp_path / "m.yml", _ta(models / "base", [models / "expert0", models / "expert1"]))
    before = sha_tree(blobs)
    _refused(models, cfg, blobs, capsys, "contains the input", str(weights))
    assert sha_tree(blobs) == before


def test_output_is_a_lora_adapter_or_its_base(models, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(models / "base")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    pm.save_pretrained(models / "adapter")
    capsys.readouterr()  # transformers' loading bar
    spec = f"{models / 'base'}+{models / 'adapter'}"
    cfg = _yaml(tmp_path / "m.yml", _ta(models / "expert0", [spec]))
    _refused(models, cfg, models / "adapter", capsys, "is the input", spec)
    cfg = _yaml(tmp_path / "m2.yml", _ta(models / "expert0", [spec, models / "expert1"]))
    _refused(models, cfg, models / "base", capsys, "is the input", spec)


def test_output_is_a_folder_holding_statistics(models, tmp_path, capsys):
    """A model given as a bare weights file keeps its statistics in a sibling folder
    (``W.safetensors.mergeforge-stats/``), outside every model folder: still an input."""
    files = [models / f"expert{i}" / "model.safetensors" for i in (0, 1)]
    for f in files:
        w = load_file(f)
        grams = {k: torch.eye(v.shape[1]) for k, v in w.items()
                 if k.endswith(".weight") and v.ndim == 2 and "embed" not in k}  # fmt: skip
        save_sidecar(f, "regmean", grams, num_examples=8, examples_used=8, source="test")
    cfg = _yaml(tmp_path / "m.yml", {"merge_method": "regmean",
                                     "models": [{"model": str(f)} for f in files]})  # fmt: skip
    assert main(["validate", str(cfg)]) == 0  # the statistics are usable: the merge would run
    capsys.readouterr()
    sdir = sidecar_dir(files[1])
    assert sdir.parent == models / "expert1" and sdir.is_dir()
    _refused(models, cfg, sdir, capsys, "contains the input", "regmean statistics")


def test_python_api_refuses_too(models, tmp_path):
    cfg = _ta(models / "base", [models / "merged", models / "expert1"])
    before = sha_tree(models)
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="is the input"):
            mergeforge.merge(cfg, models / "merged", overwrite=overwrite, progress=False)
    assert sha_tree(models) == before


# --overwrite replaces only a previous mergeforge output or an empty folder


def test_overwrite_refuses_a_folder_that_is_not_a_mergeforge_output(models, tmp_path, capsys):
    cfg = _yaml(tmp_path / "m.yml", _ta(models / "base", [models / "expert0", models / "expert1"]))
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("years of work")
    (out / "mergeforge_config.yml").write_text("a config, but no merged model beside it\n")
    before = sha_tree(out)
    code, err = _cli(cfg, out, "--overwrite", capsys=capsys)
    assert code == 2 and "Traceback" not in err
    assert "not a previous mergeforge output" in err and str(out) in err
    assert sha_tree(out) == before and _leftovers(tmp_path) == []


def test_overwrite_replaces_a_previous_output_and_an_empty_folder_is_fine(models, tmp_path, capsys):
    out = tmp_path / "out"
    a = _yaml(tmp_path / "a.yml", _ta(models / "base", [models / "expert0"], weight=0.2))
    b = _yaml(tmp_path / "b.yml", _ta(models / "base", [models / "expert0"], weight=0.9))
    out.mkdir()  # empty: fine without --overwrite
    assert _cli(a, out, capsys=capsys)[0] == 0
    first = load_dir(out)
    code, err = _cli(b, out, capsys=capsys)  # a previous output, but no --overwrite
    assert code == 2 and "--overwrite" in err
    assert _cli(b, out, "--overwrite", capsys=capsys)[0] == 0
    second = load_dir(out)
    k = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(first[k], second[k])
    assert "weight: 0.9" in (out / "mergeforge_config.yml").read_text()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["a.yml", "b.yml", "first.yml", "models", "out"]  # no old/partial folder
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _cli(a, empty, "--overwrite", capsys=capsys)[0] == 0
    assert torch.equal(load_dir(empty)[k], first[k])


def test_overwrite_refuses_a_previous_output_with_files_added_later(models, tmp_path, capsys):
    """A previous output the user added files to (a quantized copy, eval results) is not
    replaced: --overwrite would delete them. The refusal names them; nothing is touched."""
    out = tmp_path / "out"
    a = _yaml(tmp_path / "a.yml", _ta(models / "base", [models / "expert0"], weight=0.2))
    b = _yaml(tmp_path / "b.yml", _ta(models / "base", [models / "expert0"], weight=0.9))
    assert _cli(a, out, capsys=capsys)[0] == 0
    (out / "model-q4.gguf").write_text("quantized")
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "eval.json").write_text("{}")
    before = sha_tree(out)
    code, err = _cli(b, out, "--overwrite", capsys=capsys)
    assert code == 2 and "Traceback" not in err
    assert "holds files a merge did not write: 1_Pooling/eval.json, model-q4.gguf;" in err
    assert "move them away or choose another output folder" in err.lower()
    assert sha_tree(out) == before and _leftovers(tmp_path) == []
    for p in ("model-q4.gguf", "1_Pooling"):
        shutil.move(out / p, tmp_path / p)
    assert _cli(b, out, "--overwrite", capsys=capsys)[0] == 0  # only merge files: replaced
    assert "weight: 0.9" in (out / "mergeforge_config.yml").read_text()


# an unwritable output location: a clear error before any tensor is read


def test_parent_is_a_file_and_missing_parents_are_created(models, tmp_path, capsys):
    cfg = _yaml(tmp_path / "m.yml", _ta(models / "base", [models / "expert0"]))
    (tmp_path / "file").write_text("x")
    code, err = _cli(cfg, tmp_path / "file" / "sub" / "out", capsys=capsys)
    assert code == 2 and "Traceback" not in err
    assert "is a file, not a folder" in err and str(tmp_path / "file") in err
    assert _cli(cfg, tmp_path / "a" / "b" / "out", capsys=capsys)[0] == 0  # like mkdir -p
    assert (tmp_path / "a" / "b" / "out" / "mergeforge_config.yml").is_file()


def test_immutable_output_parent_is_refused_even_for_root(models, tmp_path, capsys):
    cfg = _yaml(tmp_path / "m.yml", _ta(models / "base", [models / "expert0"]))
    locked = tmp_path / "locked"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (needs root on ext4/xfs/btrfs)")
    try:
        for out in (locked / "out", locked / "missing" / "parent" / "out"):
            code, err = _cli(cfg, out, capsys=capsys)
            assert code == 2 and err.startswith("error: ") and "Traceback" not in err
            assert f"cannot write the output {str(out)!r}" in err and str(locked) in err
            assert list(locked.iterdir()) == []
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)


def test_folder_of_another_user_is_refused_for_a_normal_user(models, tmp_path):
    """The non-root path: the CLI run as ``nobody`` (privileges dropped in the child after the
    imports, since this Python lives under a private home) into a folder owned by root."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to the nobody user")
    cfg = _yaml(tmp_path / "m.yml", _ta(models / "base", [models / "expert0"]))
    shared = Path(tempfile.mkdtemp(prefix="mergeforge-perm-"))
    try:
        shared.chmod(0o755)
        (shared / "root-only").mkdir(mode=0o755)
        out = shared / "root-only" / "out"
        script = (
            "import os, sys\n"
            "import mergeforge.cli, mergeforge.engine\n"
            "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
            f"sys.exit(mergeforge.cli.main(['merge', {str(cfg)!r}, {str(out)!r}, "
            "'--no-progress']))\n"
        )
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=120)  # fmt: skip
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr
        assert f"permission denied in {shared / 'root-only'}" in r.stderr
        assert list((shared / "root-only").iterdir()) == []
    finally:
        shutil.rmtree(shared)


_NS = shutil.which("unshare")


def _in_private_tmpfs(tmp: Path, opts: str, cfg: Path, rel_out: str):
    """Run the CLI with its output on a fresh tmpfs mounted with ``opts`` in a private mount
    namespace (so nothing outlives the test); returns the run and what the tmpfs held after."""
    mnt = tmp / "mnt"
    mnt.mkdir(exist_ok=True)
    script = (
        'mount -t tmpfs -o "$1" tmpfs "$2" || exit 99; d="$2"; shift 2; "$@"; rc=$?; '
        'echo "LEFT:$(ls -A "$d" | tr "\\n" " ")"; exit $rc'
    )
    cmd = [_NS, "-m", "--propagation", "private", "sh", "-c", script, "sh", opts, str(mnt),
           sys.executable, "-m", "mergeforge.cli", "merge", str(cfg), str(mnt / rel_out),
           "--no-progress"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode == 99 or "unshare failed" in r.stderr or "Operation not permitted" in r.stderr:
        pytest.skip(f"cannot mount a private tmpfs here: {r.stderr.strip()[:200]}")
    left = r.stdout.rsplit("LEFT:", 1)[1].split()
    return r, left


@pytest.mark.skipif(_NS is None, reason="needs unshare (util-linux)")
@pytest.mark.parametrize(
    ("opts", "needle"),
    [
        ("ro,size=1m", "read-only file system at"),  # refused up front (os.access)
        ("size=1m,nr_inodes=1", "No space left on device"),  # caught by the early probe
    ],
)
def test_read_only_or_full_file_system_is_a_clear_error(models, tmp_path, opts, needle):
    cfg = _yaml(tmp_path / "m.yml", _ta(models / "base", [models / "expert0"]))
    before = sha_tree(models)
    r, left = _in_private_tmpfs(tmp_path, opts, cfg, "out")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert needle in r.stderr and f"cannot write the output '{tmp_path / 'mnt' / 'out'}'" in (
        r.stderr
    )
    assert left == []
    assert sha_tree(models) == before


@pytest.mark.skipif(_NS is None, reason="needs unshare (util-linux)")
def test_disk_full_half_way_leaves_nothing(models, tmp_path):
    """The shards do not fit (64 KiB for ~0.2 MB of weights): the write fails half-way, the
    error names the output and the fix, and the partial folder is gone."""
    cfg = _yaml(tmp_path / "m.yml", _ta(models / "base", [models / "expert0"]))
    r, left = _in_private_tmpfs(tmp_path, "size=64k", cfg, "out")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert "No space left on device" in r.stderr and "free disk space" in r.stderr
    assert left == []
