"""Hugging Face ids (``org/name``, ``@revision``, ``+org/adapter``) resolved through a fake
Hugging Face cache built in a temporary folder with huggingface_hub's real layout
(``models--org--name/{blobs,refs,snapshots}``, checked with ``huggingface_hub.scan_cache_dir``),
selected through the real ``HF_HUB_CACHE`` / ``HF_HOME`` variables. Offline throughout: the
download path needs the Hub and is not exercised here."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import scan_cache_dir
from safetensors.torch import load_file

from mergeforge.checkpoint import open_checkpoint
from mergeforge.cli import main
from mergeforge.config import load_config
from mergeforge.errors import CheckpointError, ConfigError

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def cache_repo(cache: Path, repo_id: str, folder: Path, commit: str, refs=("main",)) -> Path:
    """Put ``folder``'s files in the hub cache as ``repo_id`` at ``commit`` (files in blobs/ by
    content hash, snapshot entries as relative symlinks, ``refs/NAME`` holding the commit), as
    ``hf download`` leaves them. Returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def adapter_dir(llama_family, tmp_path_factory) -> Path:
    """A real PEFT LoRA adapter (random, non-zero B) for the llama family's base."""
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(1)
    model = LlamaForCausalLM.from_pretrained(llama_family["base"])
    cfg = peft.LoraConfig(init_lora_weights=False, r=2, target_modules=["q_proj", "v_proj"])
    peft.get_peft_model(model, cfg).save_pretrained(folder)
    return folder


@pytest.fixture
def hub(llama_family, adapter_dir, tmp_path, monkeypatch) -> Path:
    """A hub cache with org/base (main = the base; tag v1 = expert 0 at another commit),
    org/expert1, org/expert2 and org/adapter, selected with HF_HUB_CACHE."""
    cache = tmp_path / "hf-cache"
    fam = llama_family
    cache_repo(cache, "org/base", fam["base"], COMMIT_A)
    cache_repo(cache, "org/base", fam["experts"][0], COMMIT_B, refs=("v1",))
    cache_repo(cache, "org/expert1", fam["experts"][1], COMMIT_A)
    cache_repo(cache, "org/expert2", fam["experts"][2], COMMIT_B)
    cache_repo(cache, "org/adapter", adapter_dir, COMMIT_A)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _tensors(spec) -> dict[str, torch.Tensor]:
    ck = open_checkpoint(spec)
    try:
        return {k: ck.get(k) for k in ck.keys()}
    finally:
        ck.close()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fake_cache_is_the_real_layout(hub):
    info = {r.repo_id: r for r in scan_cache_dir(hub).repos}
    assert set(info) == {"org/base", "org/expert1", "org/expert2", "org/adapter"}
    assert {tuple(sorted(r.refs)) for r in info["org/base"].revisions} == {("main",), ("v1",)}


def test_id_and_revisions_resolve_from_the_cache(hub, llama_family):
    base = _tensors(str(llama_family["base"]))
    e0 = _tensors(str(llama_family["experts"][0]))
    assert not _same(base, e0)
    assert _same(_tensors("org/base"), base)  # refs/main
    assert _same(_tensors("org/base@main"), base)
    assert _same(_tensors("org/base@v1"), e0)  # a tag
    assert _same(_tensors(f"org/base@{COMMIT_B}"), e0)  # a commit hash
    ck = open_checkpoint("org/base@v1")  # the folder opened is the snapshot in the cache
    assert ck.folder == hub / "models--org--base" / "snapshots" / COMMIT_B
    assert ck.config["model_type"] == "llama"
    ck.close()


def test_cache_folder_is_read_from_hf_home_at_call_time(hub, llama_family, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    with pytest.raises(CheckpointError, match=str(tmp_path / "home" / "hub")):
        open_checkpoint("org/base")
    (tmp_path / "home").mkdir()
    hub.rename(tmp_path / "home" / "hub")  # relative symlinks: the cache moves as a whole
    assert _same(_tensors("org/base"), _tensors(str(llama_family["base"])))


def test_adapter_ids_in_any_mix(hub, llama_family, adapter_dir):
    local = _tensors(f"{llama_family['base']}+{adapter_dir}")
    assert not _same(local, _tensors(str(llama_family["base"])))  # the adapter changes weights
    for spec in (
        "org/base+org/adapter",
        f"org/base@main+org/adapter@{COMMIT_A}",
        f"{llama_family['base']}+org/adapter",
        f"org/base+{adapter_dir}",
    ):
        assert _same(_tensors(spec), local), spec


def test_local_folder_named_like_an_id_wins(hub, llama_family, tmp_path, monkeypatch):
    """`org/base` relative to the current folder (or the config's) is the local folder, as
    before; the cache is only asked for what does not exist locally."""
    import shutil

    shutil.copytree(llama_family["experts"][2], tmp_path / "cwd" / "org" / "base")
    monkeypatch.chdir(tmp_path / "cwd")
    assert _same(_tensors("org/base"), _tensors(str(llama_family["experts"][2])))
    cfg_dir = tmp_path / "cfgdir"
    shutil.copytree(llama_family["experts"][1], cfg_dir / "org" / "expert2")
    out = _merge(cfg_dir, {"merge_method": "linear", "models": [{"model": "org/expert2"}]})
    assert _same(load_file(out / "model.safetensors"), _tensors(str(llama_family["experts"][1])))


def _merge(folder: Path, cfg: dict, *extra: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "merge.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = folder / "out"
    assert main(["merge", str(folder / "merge.yml"), str(out), "--no-progress", *extra]) == 0
    return out


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_merge_from_ids_equals_merge_from_local_paths(hub, llama_family, adapter_dir, tmp_path):
    fam = llama_family
    e = [str(p) for p in fam["experts"]]

    def cfg(base, m0, m1, m2):
        return {
            "merge_method": "ties",
            "base_model": base,
            "models": [
                {"model": m0, "parameters": {"weight": 0.6, "density": 0.5}},
                {"model": m1, "parameters": {"weight": 0.4, "density": 0.7}},
                {"model": m2, "parameters": {"weight": 0.3, "density": 0.9}},
            ],
            "dtype": "float32",
        }

    ids = cfg(
        "org/base",
        "org/base@v1",  # expert 0, by tag
        {"model": {"path": "org/expert1", "revision": "main"}},  # mergekit's mapping form
        {"model": {"path": "org/base"}, "lora": {"path": "org/adapter"}},  # base + hub adapter
    )
    local = cfg(str(fam["base"]), e[0], e[1], f"{fam['base']}+{adapter_dir}")
    a = _merge(tmp_path / "ids", ids)
    b = _merge(tmp_path / "local", local)
    wa, wb = _weights(a), _weights(b)
    assert _same(wa, wb)
    assert not _same(wa, _tensors(str(fam["base"])))
    # the config and the card keep the ids as written, not the cache paths
    assert yaml.safe_load((a / "mergeforge_config.yml").read_text()) == ids
    card = (a / "README.md").read_text()
    assert "`org/base@v1`" in card and "`org/base+org/adapter`" in card and str(hub) not in card


def test_mapping_forms_read_as_mergekit_does():
    cfg = load_config(
        {
            "merge_method": "linear",
            "models": [
                {"model": {"model": {"path": "org/a", "revision": "v2"}, "lora": "org/l@r1"}},
                {"model": {"model": "org/b@v3"}},
                {"model": "org/c+org/l"},
            ],
        }
    )
    assert [m.model for m in cfg.models] == ["org/a@v2+org/l@r1", "org/b@v3", "org/c+org/l"]
    with pytest.raises(ConfigError, match="override_architecture: not supported"):
        load_config(
            {
                "merge_method": "linear",
                "models": [
                    {"model": {"model": "org/a", "override_architecture": "LlamaForCausalLM"}}
                ],
            }
        )
    with pytest.raises(ConfigError, match=r"models\[0\]\.model\.model: unknown key 'rev'"):
        load_config(
            {
                "merge_method": "linear",
                "models": [{"model": {"model": {"path": "org/a", "rev": "x"}}}],
            }
        )


@pytest.mark.parametrize(
    ("spec", "needles"),
    [
        (
            "org/missing",
            [
                "`org/missing` is not in the local Hugging Face cache",
                "`hf download org/missing`",
                "HF_HUB_OFFLINE=0",
            ],
        ),
        (
            "org/base@v9",
            ["`org/base@v9` is not in the local", "`hf download org/base --revision v9`"],
        ),
        ("org/base+org/no-adapter", ["`org/no-adapter` is not in", "`hf download org/no-adapter`"]),
    ],
)
def test_offline_and_absent_is_a_clear_cli_error(
    hub, llama_family, tmp_path, capsys, spec, needles
):
    cfg = {"merge_method": "linear", "models": [{"model": spec}, {"model": "org/expert1"}]}
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert main(["merge", str(tmp_path / "merge.yml"), str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and not out.exists()
    for n in [*needles, str(hub), "mergeforge is offline"]:
        assert n in err, (n, err)
    assert main(["inspect", spec]) == 2  # every command reads ids the same way
    assert "hf download" in capsys.readouterr().err


def test_snapshot_without_weights_names_the_download(hub, tmp_path):
    only_config = tmp_path / "cfg-only"
    only_config.mkdir()
    (only_config / "config.json").write_text('{"model_type": "llama"}')
    cache_repo(hub, "org/partial", only_config, COMMIT_A)
    with pytest.raises(CheckpointError, match="incomplete .*`hf download org/partial`"):
        open_checkpoint("org/partial")


def test_not_an_id_stays_a_missing_path(hub, tmp_path):
    for spec in (str(tmp_path / "nope"), "./org/nope", "nope"):
        with pytest.raises(CheckpointError, match="no such file or folder") as e:
            open_checkpoint(spec)
        assert "Hugging Face cache" not in str(e.value)


def test_cache_folder_agrees_with_huggingface_hub():
    """Read at call time, but by huggingface_hub's own rules: with the environment unchanged
    since import, the folder is huggingface_hub's."""
    import huggingface_hub.constants

    from mergeforge.checkpoint.hub import hub_cache_dir

    assert hub_cache_dir() == Path(huggingface_hub.constants.HF_HUB_CACHE)
