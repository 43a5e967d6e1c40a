"""The writer's output is a Hugging Face model folder: transformers loads it unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergeforge.checkpoint import ShardedWriter, open_checkpoint


@pytest.mark.parametrize("max_shard_bytes", [5_000_000_000, 3000], ids=["single", "sharded"])
def test_transformers_loads_the_output(tiny_llama, tmp_path: Path, max_shard_bytes: int) -> None:
    from transformers import LlamaForCausalLM

    base_folder, model = tiny_llama()
    src = open_checkpoint(base_folder)
    out = tmp_path / "out"
    with ShardedWriter(out, [src.info(k) for k in src.keys()],
                       max_shard_bytes=max_shard_bytes) as w:  # fmt: skip
        for k in reversed(src.keys()):
            w.write(k, src.get(k))
        for f in src.carried_files:
            w.copy_file(f, f.relative_to(base_folder).as_posix())
    src.close()
    n_shards = len(list(out.glob("*.safetensors")))
    assert n_shards == 1 if max_shard_bytes > 3000 else n_shards > 3
    loaded = LlamaForCausalLM.from_pretrained(out).eval()
    want = model.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
