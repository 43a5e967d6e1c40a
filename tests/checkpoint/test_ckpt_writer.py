"""ShardedWriter: layout by hand, any-order/threaded writes, atomicity, overwrite rules."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tests.helpers import finish, start_blocked

from mergeforge.checkpoint import ShardedWriter, TensorInfo, open_checkpoint
from mergeforge.errors import CheckpointError


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(10, generator=g),  # 40 bytes
        "b": torch.randn(10, generator=g),  # 40
        "c": torch.randn(5, 2, generator=g),  # 40
        "d": torch.randn(25, generator=g),  # 100
        "e": torch.randint(0, 9, (10,), dtype=torch.int8, generator=g),  # 10
    }


def _decl(tensors):
    return [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]


def _load_folder(out: Path) -> dict[str, torch.Tensor]:
    wm = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    sd = {}
    for shard in set(wm.values()):
        sd.update(load_file(out / shard))
    return sd


def test_greedy_sharding_and_index_by_hand(tmp_path: Path) -> None:
    sd = _tensors()
    out = tmp_path / "out"
    with ShardedWriter(out, _decl(sd), max_shard_bytes=100, metadata={"merge": "x"}) as w:
        for k in reversed(sd):  # any order
            w.write(k, sd[k])
    # 40+40 fit; +40 > 100 -> new; 40+100 > 100 -> new; 100+10 > 100 -> new
    names = [f"model-0000{i}-of-00004.safetensors" for i in (1, 2, 3, 4)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 40 * 3 + 100 + 10
    assert index["weight_map"] == {
        "a": names[0], "b": names[0], "c": names[1], "d": names[2], "e": names[3]
    }  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "model.safetensors.index.json"])
    for k, shard in index["weight_map"].items():
        with safe_open(out / shard, "pt") as f:
            assert f.metadata() == {"merge": "x", "format": "pt"}
            assert torch.equal(f.get_tensor(k), sd[k])
    ckpt = open_checkpoint(out)
    assert set(ckpt.keys()) == set(sd) and all(torch.equal(ckpt.get(k), v) for k, v in sd.items())


def test_single_shard_header_padding_and_alignment(tmp_path: Path) -> None:
    sd = {"i8": torch.ones(3, dtype=torch.int8), "f64": torch.randn(3, dtype=torch.float64),
          "f16": torch.randn(3).half(), "scalar": torch.tensor(2.5)}  # fmt: skip
    with ShardedWriter(tmp_path / "o", [TensorInfo(k, tuple(v.shape), v.dtype, "") for k, v in
                                        sd.items()]) as w:  # fmt: skip
        for k, v in sd.items():
            w.write(k, v)
    path = tmp_path / "o" / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    for k, v in sd.items():
        assert header[k]["data_offsets"][0] % v.element_size() == 0
    assert all(torch.equal(load_file(path)[k], v) for k, v in sd.items())
    wm = json.loads((tmp_path / "o" / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(wm.values()) == {"model.safetensors"}


def test_threaded_writes(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    sd = {f"t{i}": torch.randn(64, 33, generator=g) for i in range(40)}
    with ShardedWriter(tmp_path / "o", _decl(sd), max_shard_bytes=64 * 33 * 4 * 7) as w:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda k: w.write(k, sd[k]), sorted(sd, reverse=True)))
    got = _load_folder(tmp_path / "o")
    assert got.keys() == sd.keys() and all(torch.equal(got[k], v) for k, v in sd.items())


def test_missing_tensor_at_commit_names_it(tmp_path: Path) -> None:
    sd = _tensors()
    w = ShardedWriter(tmp_path / "o", _decl(sd))
    w.write("a", sd["a"])
    with pytest.raises(CheckpointError, match="'b', 'c', 'd', 'e'"):
        w.commit()
    assert not (tmp_path / "o").exists()
    for k in "bcde":  # the writer is still usable after the failed commit
        w.write(k, sd[k])
    w.commit()
    assert torch.equal(_load_folder(tmp_path / "o")["e"], sd["e"])


def test_write_validates_name_shape_dtype_and_twice(tmp_path: Path) -> None:
    with ShardedWriter(tmp_path / "o", [("w", (2, 2), torch.float32)]) as w:
        with pytest.raises(CheckpointError, match="'w'.*declared"):
            w.write("w", torch.zeros(2, 2, dtype=torch.float16))
        with pytest.raises(CheckpointError, match="'w'.*declared"):
            w.write("w", torch.zeros(4))
        with pytest.raises(CheckpointError, match="not declared"):
            w.write("v", torch.zeros(2, 2))
        w.write("w", torch.zeros(2, 2))
        with pytest.raises(CheckpointError, match="twice"):
            w.write("w", torch.zeros(2, 2))
    with pytest.raises(CheckpointError, match="twice"):
        ShardedWriter(tmp_path / "p", [("w", (1,), torch.float32)] * 2)


def test_exception_in_block_aborts(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with ShardedWriter(tmp_path / "o", [("w", (2,), torch.float32)]) as w:
            w.write("w", torch.zeros(2))
            raise RuntimeError("engine failed")
    assert sorted(os.listdir(tmp_path)) == []


def test_overwrite_rules(tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()  # an existing empty folder is fine
    with ShardedWriter(out, [("w", (2,), torch.float32)]) as w:
        w.write("w", torch.ones(2))
    with pytest.raises(CheckpointError, match="overwrite=True"):
        ShardedWriter(out, [("w", (2,), torch.float32)])
    w = ShardedWriter(out, [("w", (2,), torch.float32)], overwrite=True)
    w.write("w", torch.full((2,), 7.0))
    old = load_file(out / "model.safetensors")["w"]
    assert torch.equal(old, torch.ones(2))  # the old output stays until commit
    w.commit()
    assert torch.equal(load_file(out / "model.safetensors")["w"], torch.full((2,), 7.0))
    assert sorted(os.listdir(tmp_path)) == ["o"]  # no staging or old folders left
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="not a folder"):
        ShardedWriter(tmp_path / "f", [], overwrite=True)


def test_carried_files(tmp_path: Path) -> None:
    (tmp_path / "tok.json").write_text("{}")
    with ShardedWriter(tmp_path / "o", [("w", (1,), torch.float32)]) as w:
        w.write("w", torch.zeros(1))
        w.write_text("config.json", '{"a": 1}')
        w.copy_file(tmp_path / "tok.json", "tokenizer.json")
        w.copy_file(tmp_path / "tok.json", "1_Pooling/config.json")
        for bad in ("../x", "/abs", "model.safetensors"):
            with pytest.raises(CheckpointError):
                w.write_text(bad, "")
        with pytest.raises(CheckpointError, match="nope"):
            w.copy_file(tmp_path / "nope")
    assert (tmp_path / "o" / "config.json").read_text() == '{"a": 1}'
    assert (tmp_path / "o" / "1_Pooling" / "config.json").is_file()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_partial_folder_is_removed_and_interrupted_replace_restored(tmp_path: Path) -> None:
    pid = _dead_pid()
    stale = tmp_path / f".o.mergeforge-partial-{pid}"
    stale.mkdir()
    (stale / "junk").write_text("x")
    old = tmp_path / f".o.mergeforge-old-{pid}"  # died between the two renames of a replace
    old.mkdir()
    (old / "keep").write_text("x")
    live = tmp_path / f".o.mergeforge-partial-{os.getppid()}"  # a live pid: left alone
    live.mkdir()
    w = ShardedWriter(tmp_path / "o", [], overwrite=True)
    assert not stale.exists() and not old.exists() and live.exists()
    assert (tmp_path / "o" / "keep").exists()  # the old output was put back
    w.abort()


@pytest.mark.skipif(sys.platform != "linux", reason="uses /proc and Linux pipes")
def test_sigkill_half_way_leaves_nothing_at_output(tmp_path: Path) -> None:
    """16 of 32 tensors written (1 KiB each, 4 shards of 8), then SIGKILL: nothing at the
    output; the next writer for that output removes the partial folder. No timer: the child
    blocks writing "half" to its stderr, a full pipe (tests/helpers.py: start_blocked)."""
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import sys, torch
        from mergeforge.checkpoint import ShardedWriter
        decl = [(f"t{{i}}", (256,), torch.float32) for i in range(32)]  # 32 KiB
        w = ShardedWriter({str(out)!r}, decl, max_shard_bytes=8 << 10)
        for i, (name, shape, dtype) in enumerate(decl):
            w.write(name, torch.full(shape, float(i)))
            if i == 15:
                print("half", file=sys.stderr, flush=True)  # blocks: the pipe is full
        w.commit()
    """)
    proc, r, filled = start_blocked([sys.executable, "-c", script])
    partial = tmp_path / f".out.mergeforge-partial-{proc.pid}"
    try:
        assert len(list(partial.glob("model-*-of-00004.safetensors"))) == 4
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        finish(proc, r, filled)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and partial.exists()
    ShardedWriter(out, []).abort()  # the next start cleans up after the killed run
    assert os.listdir(tmp_path) == []


def _rename_then(monkeypatch, action) -> None:
    """``Path.rename`` of a staging folder onto its target succeeds, then runs ``action``."""
    real = Path.rename

    def rename(self, target):
        res = real(self, target)
        if ".mergeforge-partial-" in self.name:
            action()
        return res

    monkeypatch.setattr(Path, "rename", rename)


def _written_over(tmp_path: Path) -> tuple[Path, ShardedWriter]:
    out = tmp_path / "o"
    with ShardedWriter(out, [("w", (2,), torch.float32)]) as w:
        w.write("w", torch.ones(2))
    w = ShardedWriter(out, [("w", (2,), torch.float32)], overwrite=True)
    w.write("w", torch.full((2,), 7.0))
    return out, w


@pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals")
def test_sigterm_during_the_renames_is_raised_after_a_complete_commit(tmp_path, monkeypatch):
    """A SIGTERM that arrives while the new output is renamed into place is held until the
    commit is complete: the old output is removed, the writer is committed, the output is
    recorded for the CLI, and only then is the signal raised (review item 1)."""
    from mergeforge._signals import Interrupted, handle_signals
    from mergeforge.checkpoint import _staging

    out, w = _written_over(tmp_path)
    getattr(_staging, "take_committed", list)()  # forget earlier commits of this process
    _rename_then(monkeypatch, lambda: signal.raise_signal(signal.SIGTERM))
    with handle_signals(), pytest.raises(Interrupted) as e:
        w.commit()
    assert e.value.exit_code == 143
    assert torch.equal(load_file(out / "model.safetensors")["w"], torch.full((2,), 7.0))
    assert sorted(os.listdir(tmp_path)) == ["o"]  # no .o.mergeforge-old-<pid> left
    assert w._state == "committed" and _staging.take_committed() == [out]
    w.abort()  # a no-op once committed
    assert (out / "model.safetensors").is_file()


def test_an_error_after_the_rename_says_the_output_was_written(tmp_path, monkeypatch):
    """The fsync of the parent after the rename fails: the error says the output is in place
    (not "nothing was written"), the writer counts as committed and the old output is gone."""
    import mergeforge.checkpoint._staging as staging

    out, w = _written_over(tmp_path)
    real = staging.fsync_path

    def fsync_path(path):
        if Path(path) == tmp_path:
            raise OSError(5, "Input/output error", str(path))
        real(path)

    monkeypatch.setattr(staging, "fsync_path", fsync_path)
    with pytest.raises(CheckpointError, match="written completely and is in place") as e:
        w.commit()
    assert "Nothing was written" not in str(e.value) and "Input/output error" in str(e.value)
    assert w._state == "committed"
    assert torch.equal(load_file(out / "model.safetensors")["w"], torch.full((2,), 7.0))
    assert sorted(os.listdir(tmp_path)) == ["o"]


def test_abort_removes_the_parent_folders_it_created(tmp_path: Path) -> None:
    """``a/b`` did not exist: a failed run to ``a/b/o`` leaves no empty ``a/b`` (review item 4);
    a folder that existed, or that holds something else, stays."""
    with pytest.raises(RuntimeError):
        with ShardedWriter(tmp_path / "a" / "b" / "o", [("w", (2,), torch.float32)]) as w:
            w.write("w", torch.zeros(2))
            raise RuntimeError("engine failed")
    assert os.listdir(tmp_path) == []
    (tmp_path / "a").mkdir()
    w = ShardedWriter(tmp_path / "a" / "b" / "o", [("w", (2,), torch.float32)])
    (tmp_path / "a" / "b" / "mine.txt").write_text("x")  # added meanwhile: a/b is kept
    w.abort()
    assert sorted(os.listdir(tmp_path / "a" / "b")) == ["mine.txt"]
    from mergeforge.checkpoint._staging import discard_active

    ShardedWriter(tmp_path / "c" / "d" / "o", [("w", (2,), torch.float32)])
    discard_active()  # the CLI's last resort after a stop signal removes them too
    assert sorted(os.listdir(tmp_path)) == ["a"]
