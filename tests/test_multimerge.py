"""Multi-stage recipes (issue 18, item 4): mergekit-multi's YAML run by ``mergeforge merge`` and
``mergeforge multi``.

Oracles: the same tensors as ``mergekit-multi`` on the tiny llama family, fp32, for a 2-stage
recipe (TIES of two experts, then SLERP of that with a third) and a diamond (two stages using
one stage, the final merge using both), with intermediates in memory and in a temporary folder
(the same bits either way). Bad inputs, each refused before any tensor is merged and leaving
nothing behind: a cycle (named stage by stage), an unknown stage name (named, with the stage
names), duplicate names, two unnamed documents, several final candidates. Failures and stop
signals half-way leave nothing at the output and no temporary folder.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import mergeforge
import mergeforge.engine as engine
from mergeforge.cli import main
from mergeforge.engine import load_recipe, run_multimerge
from mergeforge.errors import ConfigError, ValidationError
from tests.helpers import (
    finish,
    layer_family,
    load_dir,
    sha_tree,
    start_blocked,
    write_model,
)


def _recipe(path: Path, *docs: dict) -> Path:
    path.write_text("\n---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs))
    return path


def _two_stage(fam: dict) -> tuple[dict, dict]:
    b, e = str(fam["base"]), [str(p) for p in fam["experts"]]
    first = {
        "name": "experts",
        "merge_method": "ties",
        "base_model": b,
        "models": [
            {"model": e[0], "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": e[1], "parameters": {"weight": [0.2, 0.8], "density": 0.7}},
        ],
        "parameters": {"normalize": True},
        "dtype": "float32",
    }
    final = {
        "merge_method": "slerp",
        "base_model": "experts",
        "models": [{"model": "experts"}, {"model": e[2]}],
        "parameters": {"t": [{"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.4}]},
        "dtype": "float32",
    }
    return first, final


def _diamond(fam: dict) -> list[dict]:
    """``a`` from the experts; ``b`` and ``c`` each use ``a``; the final merge uses both."""
    b, e = str(fam["base"]), [str(p) for p in fam["experts"]]
    return [
        {"name": "a", "merge_method": "task_arithmetic", "base_model": b, "dtype": "float32",
         "models": [{"model": e[0], "parameters": {"weight": 0.7}},
                    {"model": e[1], "parameters": {"weight": [0.1, 0.9, 0.3]}}]},
        {"name": "b", "merge_method": "slerp", "base_model": "a", "dtype": "float32",
         "models": [{"model": "a"}, {"model": e[2]}], "parameters": {"t": 0.3}},
        {"name": "c", "merge_method": "ties", "base_model": b, "dtype": "float32",
         "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.6}},
                    {"model": e[1], "parameters": {"weight": 0.5, "density": 0.4}}]},
        {"merge_method": "linear", "dtype": "float32",
         "models": [{"model": "b", "parameters": {"weight": 0.6}},
                    {"model": "c", "parameters": {"weight": 0.4}}]},
    ]  # fmt: skip


def _mergekit_multi(recipe: Path, tmp: Path, out: str = "mk-out") -> dict[str, torch.Tensor]:
    done = subprocess.run(
        ["mergekit-multi", str(recipe), "-I", str(tmp / "mk-stages"), "--out-path",
         str(tmp / out), "--no-copy-tokenizer", "--quiet", "--random-seed", "0"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return load_dir(tmp / out)


def _assert_close(ours: dict, theirs: dict, tol: float = 1e-6) -> None:
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))
    worst = max((ours[k].float() - theirs[k].float()).abs().max().item() for k in ours)
    assert worst <= tol, worst


def _clean(tmp: Path, *keep: str) -> None:
    """Nothing at the output and no hidden folder (partial output, stages) left in ``tmp``."""
    names = sorted(p.name for p in tmp.iterdir())
    assert not [n for n in names if n.startswith(".")], names
    assert not [n for n in names if n not in keep], names


# ---- the oracle: mergekit-multi ------------------------------------------------------------


@pytest.mark.mergekit
@pytest.mark.parametrize("intermediates", ["memory", "disk"])
def test_two_stages_equal_mergekit_multi(llama_family, tmp_path, intermediates, capsys):
    recipe = _recipe(tmp_path / "recipe.yml", *_two_stage(llama_family))
    theirs = _mergekit_multi(recipe, tmp_path)
    argv = ["multi", str(recipe), "--out-path", str(tmp_path / "out"), "--no-progress",
            "--intermediates", intermediates]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    ours = load_dir(tmp_path / "out")
    _assert_close(ours, theirs)
    assert not [p for p in tmp_path.iterdir() if ".mergeforge-stages-" in p.name]
    # the output's config is the whole recipe: running it again gives the same bits
    assert (tmp_path / "out" / "mergeforge_config.yml").read_text() == recipe.read_text()
    assert (tmp_path / "out" / "config.json").is_file()
    assert main(["merge", str(tmp_path / "out" / "mergeforge_config.yml"), str(tmp_path / "again"),
                 "--no-progress"]) == 0  # fmt: skip
    again = load_dir(tmp_path / "again")
    assert all(torch.equal(again[k], ours[k]) for k in ours)


@pytest.mark.mergekit
def test_diamond_equals_mergekit_multi(llama_family, tmp_path, capsys):
    recipe = _recipe(tmp_path / "diamond.yml", *_diamond(llama_family))
    theirs = _mergekit_multi(recipe, tmp_path)
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--no-progress"]) == 0
    ours = load_dir(tmp_path / "out")
    _assert_close(ours, theirs)
    # stage 'a' is used twice and computed once; memory and temporary folders give the same bits
    disk = run_multimerge(recipe, tmp_path / "disk", intermediates="disk", progress=False)
    assert disk.method == "linear"
    other = load_dir(tmp_path / "disk")
    assert all(torch.equal(other[k], ours[k]) for k in ours)


@pytest.mark.mergekit
def test_multi_keeps_stages_like_mergekit_multi(llama_family, tmp_path, capsys):
    """``-I DIR``: every named stage in DIR/NAME (equal to mergekit-multi's), the unnamed one at
    --out-path; a second run reuses the stages (--lazy), --no-lazy merges them again."""
    recipe = _recipe(tmp_path / "diamond.yml", *_diamond(llama_family))
    _mergekit_multi(recipe, tmp_path)
    argv = ["multi", str(recipe), "-I", str(tmp_path / "stages"), "--out-path",
            str(tmp_path / "out"), "--no-progress"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    for name in ("a", "b", "c"):
        _assert_close(load_dir(tmp_path / "stages" / name), load_dir(tmp_path / "mk-stages" / name))
    _assert_close(load_dir(tmp_path / "out"), load_dir(tmp_path / "mk-out"))
    before = {n: load_dir(tmp_path / "stages" / n) for n in "abc"}
    mtimes = {n: (tmp_path / "stages" / n / "model.safetensors").stat().st_mtime_ns for n in "abc"}
    assert main([*argv, "--overwrite"]) == 0
    assert {n: (tmp_path / "stages" / n / "model.safetensors").stat().st_mtime_ns
            for n in "abc"} == mtimes  # fmt: skip
    assert main([*argv, "--overwrite", "--no-lazy"]) == 0
    for n in "abc":  # merged again: the same bits
        after = load_dir(tmp_path / "stages" / n)
        assert all(torch.equal(after[k], before[n][k]) for k in after)
    assert (tmp_path / "stages" / "a" / "model.safetensors").stat().st_mtime_ns != mtimes["a"]


@pytest.mark.mergekit
def test_all_named_final_is_the_stage_nobody_uses(llama_family, tmp_path):
    """mergekit's examples/mega.yml shape: every document named; `merge` writes the one stage
    no other stage uses (mergekit-multi writes it to DIR/NAME)."""
    first, final = _two_stage(llama_family)
    recipe = _recipe(tmp_path / "r.yml", first, {**final, "name": "final"})
    argv = ["mergekit-multi", str(recipe), "-I", str(tmp_path / "mk"), "--quiet",
            "--no-copy-tokenizer"]  # fmt: skip
    subprocess.run(argv, check=True, capture_output=True, timeout=600)
    mergeforge.merge(str(recipe), tmp_path / "out", progress=False)  # the Python API too
    _assert_close(load_dir(tmp_path / "out"), load_dir(tmp_path / "mk" / "final"))


# ---- what is checked, before any merging ----------------------------------------------------


@pytest.fixture
def no_merging(monkeypatch):
    """Fail the test if any stage starts merging tensors: errors must come first."""

    def forbidden(*a, **k):
        raise AssertionError("a stage ran before the recipe was checked")

    monkeypatch.setattr(engine, "_run_plan", forbidden)


def _refused(tmp_path, capsys, *docs, needles=(), argv_extra=()) -> str:
    recipe = _recipe(tmp_path / "recipe.yml", *docs)
    code = main(["merge", str(recipe), str(tmp_path / "out"), "--no-progress", *argv_extra])
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    _clean(tmp_path, "recipe.yml", "llama-base")
    return err


def test_cycle_names_the_stages(llama_family, tmp_path, capsys, no_merging):
    b = str(llama_family["base"])
    docs = [
        {"name": "x", "merge_method": "linear", "models": [{"model": "z"}, {"model": b}]},
        {"name": "y", "merge_method": "linear", "models": [{"model": "x"}, {"model": b}]},
        {"name": "z", "merge_method": "linear", "models": [{"model": "y"}, {"model": b}]},
        {"merge_method": "linear", "models": [{"model": "z"}, {"model": b}]},
    ]
    err = _refused(tmp_path, capsys, *docs, needles=["cycle"])
    assert any(c in err for c in ("'x' -> 'z' -> 'y' -> 'x'", "'z' -> 'y' -> 'x' -> 'z'",
                                  "'y' -> 'x' -> 'z' -> 'y'"))  # fmt: skip
    with pytest.raises(ConfigError, match=r"cycle: 'self' -> 'self'"):
        load_recipe(
            "name: self\nmerge_method: linear\nmodels: [{model: self}, {model: a}]\n---\n"
            "merge_method: linear\nmodels: [{model: self}, {model: a}]\n"
        )


def test_unknown_stage_name_is_named_with_the_stages(llama_family, tmp_path, capsys, no_merging):
    first, final = _two_stage(llama_family)
    final["models"][0]["model"] = "expert"  # a typo of the stage name "experts"
    err = _refused(tmp_path, capsys, first, final,
                   needles=["'expert'", "not a stage of this recipe", "experts",
                            "Did you mean 'experts'?", "the unnamed final merge"])  # fmt: skip
    assert "no such file" in err


def test_duplicate_and_unnamed_documents(llama_family, tmp_path, capsys, no_merging):
    first, final = _two_stage(llama_family)
    _refused(tmp_path, capsys, first, first, final,
             needles=["documents 1 and 2 are both named 'experts'"])  # fmt: skip
    _refused(tmp_path, capsys, first, final, final,
             needles=["documents 2 and 3 both have no 'name:'"])  # fmt: skip


def test_several_final_candidates(llama_family, tmp_path, capsys, no_merging):
    first, final = _two_stage(llama_family)
    other = {**first, "name": "other"}
    err = _refused(
        tmp_path,
        capsys,
        first,
        {**final, "name": "f"},
        other,
        needles=["'f', 'other' are used by no other stage", "--intermediate-dir"],
    )
    assert "mergeforge multi" in err


def test_every_stage_is_checked_before_the_first_runs(llama_family, tmp_path, capsys, no_merging):
    """A mistake in the last stage (a bad layer range, an unknown parameter, a missing model)
    is reported before the first stage merges anything."""
    first, final = _two_stage(llama_family)
    bad_range = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "experts", "layer_range": [0, 9]}]}]}  # fmt: skip
    _refused(
        tmp_path,
        capsys,
        first,
        bad_range,
        needles=["the unnamed final merge", "past the end of experts, which has 3 layers"],
    )
    _refused(
        tmp_path,
        capsys,
        first,
        {**final, "parameters": {"tt": 0.5}},
        needles=["document 2", "unknown parameter 'tt'", "Did you mean 't'?"],
    )
    _refused(tmp_path, capsys, first, {**final, "models": [{"model": "experts"},
                                                           {"model": "./nowhere"}]},
             needles=["./nowhere", "no such file", "not a stage of this recipe"])  # fmt: skip


def test_a_stage_name_wins_over_a_folder_of_that_name(llama_family, tmp_path, monkeypatch, caplog):
    """mergekit-multi replaces every reference whose path is a stage name, whatever exists on
    disk; mergeforge does the same and says so."""
    first, final = _two_stage(llama_family)
    monkeypatch.chdir(tmp_path)
    os.symlink(llama_family["experts"][0], tmp_path / "experts")  # a real model named "experts"
    recipe = _recipe(tmp_path / "r.yml", first, final)
    res = run_multimerge(recipe, tmp_path / "out", progress=False)
    assert any("names both a stage of this recipe and a local path" in w for w in res.warnings)
    ref = run_multimerge(_recipe(tmp_path / "r2.yml", {**first, "name": "st"},
                                 {**final, "base_model": "st",
                                  "models": [{"model": "st"}, final["models"][1]]}),
                         tmp_path / "out2", progress=False)  # fmt: skip
    assert ref.method == "slerp"
    a, b = load_dir(tmp_path / "out"), load_dir(tmp_path / "out2")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- failures and stop signals leave nothing -------------------------------------------------


def test_error_in_a_later_stage_leaves_nothing(tmp_path, capsys):
    """The final merge reads a tensor with a NaN (found only when it is read, after the first
    stage ran in a temporary folder): nothing at the output, no temporary folder."""
    base, e1, e2 = layer_family(tmp_path, n=4, dim=16)
    bad = load_dir(e2)
    bad["model.layers.3.mlp.weight"][0, 0] = float("nan")
    write_model(e2, bad)
    docs = [
        {"name": "s", "merge_method": "task_arithmetic", "base_model": str(base),
         "models": [{"model": str(e1), "parameters": {"weight": 0.5}}]},
        {"merge_method": "task_arithmetic", "base_model": str(base),
         "models": [{"model": "s", "parameters": {"weight": 0.5}},
                    {"model": str(e2), "parameters": {"weight": 0.5}}]},
    ]  # fmt: skip
    recipe = _recipe(tmp_path / "r.yml", *docs)
    for mode in ("memory", "disk"):
        code = main(["multi", str(recipe), "--out-path", str(tmp_path / "out"), "--no-progress",
                     "--intermediates", mode])  # fmt: skip
        err = capsys.readouterr().err
        assert code != 0 and "NaN" in err and "Traceback" not in err, err
        _clean(tmp_path, "models", "r.yml")


def test_a_dead_runs_stages_folder_is_removed(llama_family, tmp_path):
    stale = tmp_path / ".out.mergeforge-stages-999999999"
    (stale / "01-experts").mkdir(parents=True)
    run_multimerge(_recipe(tmp_path / "r.yml", *_two_stage(llama_family)), tmp_path / "out",
                   progress=False, intermediates="disk")  # fmt: skip
    assert not stale.exists() and (tmp_path / "out" / "model.safetensors").is_file()
    _clean(tmp_path, "r.yml", "out")


@pytest.mark.skipif(sys.platform != "linux", reason="uses /proc and Linux pipes")
@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_sigterm_in_the_first_stage_leaves_nothing(tmp_path, mode):
    base, e1, e2 = layer_family(tmp_path, n=20, dim=256)
    docs = [
        {"name": "s", "merge_method": "task_arithmetic", "base_model": str(base),
         "models": [{"model": str(e1), "parameters": {"weight": 0.5}}]},
        {"merge_method": "task_arithmetic", "base_model": str(base),
         "models": [{"model": "s", "parameters": {"weight": 0.5}},
                    {"model": str(e2), "parameters": {"weight": 0.5}}]},
    ]  # fmt: skip
    recipe = _recipe(tmp_path / "r.yml", *docs)
    inputs = sha_tree(tmp_path / "models")
    argv = [sys.executable, "-m", "mergeforge.cli", "multi", str(recipe), "--out-path",
            str(tmp_path / "out"), "--intermediates", mode]  # fmt: skip
    proc, r, filled = start_blocked(argv)
    stages = tmp_path / f".out.mergeforge-stages-{proc.pid}"
    assert stages.is_dir()  # blocked inside the first stage
    proc.send_signal(signal.SIGTERM)
    err = finish(proc, r, filled)
    assert proc.returncode == 143, err
    assert "interrupted by SIGTERM" in err and "nothing was written" in err, err
    assert "Traceback" not in err
    _clean(tmp_path, "models", "r.yml")
    assert sha_tree(tmp_path / "models") == inputs


# ---- the command lines ------------------------------------------------------------------------


def test_multi_needs_an_output(tmp_path, capsys):
    recipe = _recipe(tmp_path / "r.yml", {"name": "a", "merge_method": "linear",
                                          "models": [{"model": "x"}]},
                     {"merge_method": "linear", "models": [{"model": "a"}]})  # fmt: skip
    assert main(["multi", str(recipe)]) == 2
    assert "give --out-path OUT" in capsys.readouterr().err
    assert main(["multi", str(recipe), "-I", str(tmp_path / "st")]) == 2
    assert "needs an output folder (--out-path), as in mergekit-multi" in capsys.readouterr().err


def test_one_document_is_a_plain_config(llama_family, tmp_path):
    """A single document with ``name:`` is an ordinary merge (mergekit-yaml ignores name)."""
    first, _ = _two_stage(llama_family)
    p = _recipe(tmp_path / "one.yml", first)
    assert not engine.is_recipe(str(p))
    res = mergeforge.merge(str(p), tmp_path / "out", progress=False)
    assert res.method == "ties"


def test_load_config_points_to_the_recipe_runner():
    with pytest.raises(ConfigError, match="multi-stage recipe .* `mergeforge merge CONFIG OUT`"):
        mergeforge.load_config("name: a\nmerge_method: linear\nmodels: [{model: x}]\n---\n"
                               "merge_method: linear\nmodels: [{model: a}]\n")  # fmt: skip


def test_validation_error_names_the_stage(llama_family, tmp_path, no_merging):
    """A shape mismatch found while planning the second stage names the stage."""
    first, final = _two_stage(llama_family)
    odd = write_model(tmp_path / "odd", {"model.embed_tokens.weight": torch.zeros(3, 3)})
    final["models"][1]["model"] = str(odd)
    with pytest.raises(ValidationError, match="the unnamed final merge"):
        run_multimerge(_recipe(tmp_path / "r.yml", first, final), tmp_path / "out")


# ---- inputs are never written: every target against every stage's inputs ----------------------


def test_a_kept_stage_is_never_written_inside_another_stages_input(
    llama_family, tmp_path, capsys, no_merging
):
    """``-I DIR`` with DIR inside a model only the final merge reads: stage 's1' would be
    written into that model. Refused before any stage runs; nothing written anywhere."""
    import shutil

    fourth = Path(shutil.copytree(llama_family["experts"][2], tmp_path / "fourth"))
    before = sha_tree(fourth)
    b, e = str(llama_family["base"]), [str(p) for p in llama_family["experts"]]
    docs = [
        {"name": "s1", "merge_method": "linear",
         "models": [{"model": b, "parameters": {"weight": 0.5}},
                    {"model": e[0], "parameters": {"weight": 0.5}}]},
        {"merge_method": "linear",
         "models": [{"model": "s1", "parameters": {"weight": 0.5}},
                    {"model": str(fourth), "parameters": {"weight": 0.5}}]},
    ]  # fmt: skip
    recipe = _recipe(tmp_path / "r.yml", *docs)
    code = main(["multi", str(recipe), "-I", str(fourth / "stages"), "--out-path",
                 str(tmp_path / "out"), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err, err
    for needle in (f"{fourth / 'stages' / 's1'}", "lies inside the input", str(fourth),
                   "the unnamed final merge"):  # fmt: skip
        assert needle in err, err
    assert sha_tree(fourth) == before and not (fourth / "stages").exists()
    _clean(tmp_path, "fourth", "r.yml")
    # the final output inside an input of the first stage only: refused the same way
    code = main(["multi", str(recipe), "--out-path", str(fourth / "x"), "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0 and "lies inside the input" in err, err
    # and a kept stage inside an input of the first stage, which the stage does not read itself
    docs[0]["models"][1]["model"] = str(fourth)
    docs[1]["models"][1]["model"] = e[1]
    recipe = _recipe(tmp_path / "r.yml", *docs)
    code = main(["multi", str(recipe), "-I", str(tmp_path / "st"), "--out-path",
                 str(fourth / "final"), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0 and "lies inside the input" in err and "stage 's1'" in err, err
    assert sha_tree(fourth) == before
    _clean(tmp_path, "fourth", "r.yml")


# ---- vocabularies across stages -----------------------------------------------------------------


@pytest.fixture(scope="module")
def vfam(tmp_path_factory) -> dict[str, str]:
    from tests.helpers import vocab_family

    return vocab_family(tmp_path_factory.mktemp("vocab"))


def _vocab_of(folder) -> dict[str, int]:
    import transformers

    return transformers.AutoTokenizer.from_pretrained(folder).get_vocab()


def _union_recipe(vfam: dict, source: str = "union") -> list[dict]:
    """'s1' merges two models sharing the base's tokenizer; the final merge realigns 's1' (the
    base) with a model whose tokenizer differs."""
    return [
        {"name": "s1", "merge_method": "linear", "dtype": "float32",
         "models": [{"model": vfam["base"], "parameters": {"weight": 0.5}},
                    {"model": vfam["same"], "parameters": {"weight": 0.5}}]},
        {"merge_method": "linear", "base_model": "s1", "dtype": "float32",
         "models": [{"model": "s1", "parameters": {"weight": 0.5}},
                    {"model": vfam["shuffled"], "parameters": {"weight": 0.5}}],
         "tokenizer_source": source},
    ]  # fmt: skip


@pytest.mark.mergekit
@pytest.mark.parametrize("source", ["union", "base"])
def test_a_stage_as_input_of_a_vocabulary_merge_equals_mergekit_multi(vfam, tmp_path, source):
    """A stage's output is an input of a later stage with ``tokenizer_source: union`` (or
    ``base``, the stage being the base): planned with the tokenizer the stage will carry, and
    merged as mergekit-multi merges it, with intermediates in memory and on disk."""
    recipe = _recipe(tmp_path / "r.yml", *_union_recipe(vfam, source))
    done = subprocess.run(
        ["mergekit-multi", str(recipe), "-I", str(tmp_path / "mk-stages"), "--out-path",
         str(tmp_path / "mk-out"), "--quiet", "--random-seed", "0"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    theirs, vk = load_dir(tmp_path / "mk-out"), _vocab_of(tmp_path / "mk-out")
    for mode in ("memory", "disk"):
        out = tmp_path / f"out-{mode}"
        run_multimerge(recipe, out, intermediates=mode, progress=False)
        ours, vo = load_dir(out), _vocab_of(out)
        assert set(ours) == set(theirs) and set(vo) == set(vk)
        for name, want in theirs.items():
            got = ours[name]
            assert got.shape == want.shape, name
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                for tok in vk:
                    torch.testing.assert_close(got[vo[tok]], want[vk[tok]], atol=1e-6, rtol=0)
            else:
                torch.testing.assert_close(got, want, atol=1e-6, rtol=0, msg=name)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_stage_tokenizer_mismatch_is_found_before_any_stage_runs(
    vfam, tmp_path, capsys, no_merging
):
    """No tokenizer option, and stage 's1' (the base's tokenizer) merged with a model whose
    tokenizer gives tokens other ids: refused while planning, naming stage 's1' (not a
    temporary folder) and the fix; nothing left behind."""
    docs = _union_recipe(vfam)
    del docs[1]["tokenizer_source"]
    err = _refused_vocab(tmp_path, capsys, docs)
    assert "stage 's1'" in err and "tokenizer_source: union" in err, err
    assert "mergeforge-" not in err and f"{vfam['shuffled']}/tokenizer.json" in err, err
    # -I DIR: the same, before the kept stage is written
    recipe = _recipe(tmp_path / "recipe.yml", *docs)
    code = main(["multi", str(recipe), "-I", str(tmp_path / "st"), "--out-path",
                 str(tmp_path / "out"), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0 and "stage 's1'" in err and "mergeforge-" not in err, err
    _clean(tmp_path, "recipe.yml")
    # union of a stage whose own merge has no tokenizer files at all: named, with the fix
    bare = [dict(d) for d in _union_recipe(vfam)]
    bare[0]["models"] = [{"model": vfam["no_tokenizer"], "parameters": {"weight": 1.0}}]
    err = _refused_vocab(tmp_path, capsys, bare)
    assert "stage 's1'" in err and "no tokenizer" in err and "mergeforge-" not in err, err


def _refused_vocab(tmp_path, capsys, docs) -> str:
    recipe = _recipe(tmp_path / "recipe.yml", *docs)
    code = main(["merge", str(recipe), str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("error: ") and "Traceback" not in err, err
    _clean(tmp_path, "recipe.yml")
    return err


# ---- mergeforge validate on a recipe ------------------------------------------------------------


def test_validate_plans_every_stage_of_a_recipe(vfam, llama_family, tmp_path, capsys, no_merging):
    """``mergeforge validate RECIPE``: every stage planned (a stage's output stood in for, its
    vocabulary too), each stage's summary and warnings printed, nothing merged or written;
    a recipe that would fail, fails here, naming the stage."""
    import tempfile

    before = {p.name for p in Path(tempfile.gettempdir()).glob("mergeforge-recipe-plan-*")}
    recipe = _recipe(tmp_path / "r.yml", *_diamond(llama_family))
    assert main(["validate", str(recipe)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    heads = [line for line in lines if not line.startswith(" ")]
    assert heads == ["stage 'a' (document 1):", "stage 'b' (document 2):",
                     "stage 'c' (document 3):", "the unnamed final merge (document 4):",
                     "ok: recipe of 4 stages, final: the unnamed final merge (document 4); "
                     "nothing was merged"], out  # fmt: skip
    assert sum(line.startswith("  ok: ") for line in lines) == 4, out
    recipe = _recipe(tmp_path / "v.yml", *_union_recipe(vfam))
    assert main(["validate", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "  ok: linear over 2 model(s)" in out, out
    assert "  output vocabulary (union): 43 tokens" in out and "mergeforge-" not in out, out
    docs = _union_recipe(vfam)
    del docs[1]["tokenizer_source"]
    assert main(["validate", str(_recipe(tmp_path / "bad.yml", *docs))]) != 0
    err = capsys.readouterr().err
    assert "stage 's1'" in err and "tokenizers differ" in err and "mergeforge-" not in err, err
    _clean(tmp_path, "r.yml", "v.yml", "bad.yml")
    after = {p.name for p in Path(tempfile.gettempdir()).glob("mergeforge-recipe-plan-*")}
    assert after <= before
