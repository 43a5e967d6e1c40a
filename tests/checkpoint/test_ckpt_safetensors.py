"""The safetensors reader against the reference implementation, and its validation at open."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergeforge.checkpoint import ShardedWriter, open_checkpoint
from mergeforge.checkpoint._dtypes import SAFETENSORS_DTYPES
from mergeforge.checkpoint.safetensors_file import SafetensorsFile
from mergeforge.errors import CheckpointError

# dtypes the reference python package can save/load (the rest are checked writer -> reader)
_REFERENCE = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "C64",
              "F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2", "F8_E5M2FNUZ", "U64", "U32", "U16"}  # fmt: skip
SHAPES = [(3, 5), (), (0, 4), (7,)]


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Arbitrary bit patterns: every byte value occurs, so a byte-exact compare means something."""
    g = torch.Generator().manual_seed(seed)
    nbytes = torch.empty(shape, dtype=dtype).nbytes
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def _bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


@pytest.mark.parametrize("st_dtype", sorted(SAFETENSORS_DTYPES))
def test_round_trip_every_dtype(tmp_path: Path, st_dtype: str) -> None:
    dtype = SAFETENSORS_DTYPES[st_dtype]
    tensors = {f"t{i}": _sample(dtype, s, i) for i, s in enumerate(SHAPES)}
    # our writer -> our reader
    with ShardedWriter(tmp_path / "out", [(k, v.shape, v.dtype) for k, v in tensors.items()]) as w:
        for k, v in tensors.items():
            w.write(k, v)
    src = SafetensorsFile(tmp_path / "out" / "model.safetensors")
    assert all(_bytes_equal(src.get(k), v) for k, v in tensors.items())
    assert src.info("t0").dtype == dtype and src.info("t0").shape == (3, 5)
    if st_dtype in _REFERENCE:
        # reference writer -> our reader, and our writer -> reference reader
        save_file(tensors, tmp_path / "ref.safetensors")
        ours = SafetensorsFile(tmp_path / "ref.safetensors")
        ref = load_file(tmp_path / "out" / "model.safetensors")
        for k, v in tensors.items():
            assert _bytes_equal(ours.get(k), v)
            assert _bytes_equal(ref[k], v)


def test_get_equals_load_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tensors = {f"layer.{i}.weight": torch.randn(17, 9 + i) for i in range(6)}
    tensors["mask"] = torch.rand(5) > 0.5
    tensors["half"] = torch.randn(4, 4).half()
    path = tmp_path / "m.safetensors"
    save_file(tensors, path, metadata={"who": "test"})
    ref = load_file(path)
    src = SafetensorsFile(path)
    assert sorted(src.keys()) == sorted(ref)
    for k in src.keys():
        assert torch.equal(src.get(k), ref[k]) and src.get(k).dtype == ref[k].dtype
    assert src.metadata == {"who": "test"}
    assert src.info("mask").file == str(path)
    src.close()
    assert torch.equal(src.get("half"), ref["half"])  # reopens after close


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_tensor_maps_only_its_range_and_only_while_alive(tmp_path: Path) -> None:
    import gc

    path = tmp_path / "map.safetensors"
    ref = torch.randn(64, 64)
    save_file({"w": ref}, path)
    src = SafetensorsFile(path)
    w = src.get("w")
    assert torch.equal(w, ref)
    assert str(path) in Path("/proc/self/maps").read_text()
    del w
    gc.collect()
    assert str(path) not in Path("/proc/self/maps").read_text()  # unmapped with the tensor


def test_pread_mode_gives_a_private_writable_copy(tmp_path: Path, monkeypatch) -> None:
    import mergeforge.checkpoint.safetensors_file as sf

    monkeypatch.setattr(sf, "_USE_MMAP", False)
    path = tmp_path / "nomap.safetensors"
    save_file({"w": torch.randn(64, 64)}, path)
    src = SafetensorsFile(path)
    w = src.get("w")
    assert str(path) not in Path("/proc/self/maps").read_text()
    w.add_(1)
    assert not torch.equal(w, src.get("w"))


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS semantics are Linux's")
def test_reads_under_address_space_limit_below_file_size(tmp_path: Path) -> None:
    """32 tensors of 4 MiB (128 MiB) are read under a limit of current usage + 32 MiB."""
    path = tmp_path / "big.safetensors"
    save_file({f"t{i}": torch.full((1 << 20,), float(i)) for i in range(32)}, path)
    script = textwrap.dedent(f"""
        import resource, re, torch
        from mergeforge.checkpoint.safetensors_file import SafetensorsFile
        vm = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read())[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (32 << 20), resource.RLIM_INFINITY))
        src = SafetensorsFile({str(path)!r})
        for k in src.keys():
            assert src.get(k)[-1].item() == float(k[1:]), k
        try:
            bytearray(150 << 20)
        except MemoryError:
            print("LIMITED")
        print("OK")
    """)
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["LIMITED", "OK"]  # the limit was real and reading fit under it


def _write_raw(path: Path, header: dict, data: bytes, length: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def test_truncated_file_names_file_and_first_missing_tensor(tmp_path: Path) -> None:
    path = tmp_path / "trunc.safetensors"
    save_file({"a": torch.zeros(100), "b": torch.zeros(100), "c": torch.zeros(100)}, path)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 500)  # cuts into "b" (bytes 400..800 of the data), removes "c"
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(path)
    msg = str(e.value)
    assert str(path) in msg and "truncated" in msg and "'b'" in msg and "'c'" not in msg
    assert "re-download or re-save it" in msg


@pytest.mark.parametrize(
    "header, data, length, needle",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 1 << 40,
         "header length"),
        (None, b"", None, "not valid JSON"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None,
         "needs 12"),
        ({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None,
         "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None,
         "shape"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None,
         "overlap"),
        ([1, 2], b"", None, "not a JSON object"),
    ],
)  # fmt: skip
def test_bad_header_is_refused_at_open(tmp_path, header, data, length, needle) -> None:
    path = tmp_path / "bad.safetensors"
    if header is None:
        raw = b"{not json"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    else:
        _write_raw(path, header, data, length)
    with pytest.raises(CheckpointError, match=needle) as e:
        SafetensorsFile(path)
    assert str(path) in str(e.value)


def test_tiny_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="too small"):
        SafetensorsFile(tmp_path / "x.safetensors")
