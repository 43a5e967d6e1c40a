#!/usr/bin/env python
"""I/O floor for a merge: read every input tensor once, write one output.

    python benchmarks/io_floor.py --out OUT_DIR BASE_DIR EXPERT_DIR [EXPERT_DIR ...]
    python benchmarks/io_floor.py --mode safetensors --out OUT_DIR BASE EXPERT ...

``--mode raw`` (default, the floor): the safetensors headers are parsed and, for
every tensor of the first model, that tensor's bytes are read with ``read(2)``
(``readinto`` a reused buffer, so no page-fault or allocation cost) from every
input model; the first model's bytes are written to one output safetensors file
(same header, so the output is a valid safetensors file of the same size).
Nothing else: no arithmetic, no torch.

``--mode safetensors``: the same through the usual API: ``safe_open`` +
``get_tensor(...).clone()`` (clone, because get_tensor may return a zero-copy
view of the mmapped file) for every tensor of every model, then
``safetensors.torch.save_file`` of the first model's tensors.

Either way this is a lower bound for any merge of these inputs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import time
from pathlib import Path


def _header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


def io_floor_raw(model_dirs: list[Path], out: Path) -> dict:
    t0 = time.perf_counter()
    # per model: tensor name -> (file path, absolute start, length)
    where: list[dict[str, tuple[Path, int, int]]] = []
    headers = {}
    for d in model_dirs:
        idx = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            n, h = _header(f)
            headers[f] = (n, h)
            for k, v in h.items():
                if k == "__metadata__":
                    continue
                s, e = v["data_offsets"]
                idx[k] = (f, 8 + n + s, e - s)
        where.append(idx)
    biggest = max(ln for idx in where for (_, _, ln) in idx.values())
    bufs = [bytearray(biggest) for _ in model_dirs]
    fhs: dict[Path, object] = {}

    def fh(p: Path):
        if p not in fhs:
            fhs[p] = open(p, "rb", buffering=0)
        return fhs[p]

    out.mkdir(parents=True, exist_ok=True)
    nread = nwritten = 0
    t_read = 0.0
    # one output file per input file of the first model, written in offset order
    base_files = sorted(Path(model_dirs[0]).glob("*.safetensors"))
    for bf in base_files:
        n, h = headers[bf]
        names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
        with open(out / bf.name, "wb", buffering=0) as w:
            with open(bf, "rb") as f:
                w.write(f.read(8 + n))  # same header
            nwritten += 8 + n
            for k in names:
                tr = time.perf_counter()
                for idx, buf in zip(where, bufs, strict=True):
                    p, off, ln = idx[k]
                    g = fh(p)
                    g.seek(off)
                    mv = memoryview(buf)[:ln]
                    got = 0
                    while got < ln:
                        got += g.readinto(mv[got:])
                    nread += ln
                t_read += time.perf_counter() - tr
                w.write(memoryview(bufs[0])[: where[0][k][2]])
                nwritten += where[0][k][2]
    for g in fhs.values():
        g.close()
    for extra in ("config.json", "model.safetensors.index.json"):
        src = Path(model_dirs[0]) / extra
        if src.exists():
            shutil.copy2(src, out / extra)
    total = time.perf_counter() - t0
    return {
        "read_s": t_read,
        "write_s": total - t_read,
        "bytes_read": nread,
        "bytes_written": nwritten,
    }


def io_floor_safetensors(model_dirs: list[Path], out: Path) -> dict:
    from safetensors import safe_open
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    handles = []
    for d in model_dirs:
        idx = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            h = safe_open(str(f), framework="pt")
            for k in h.keys():
                idx[k] = h
        handles.append(idx)
    result = {}
    nread = 0
    for name in handles[0]:
        ts = [idx[name].get_tensor(name).clone() for idx in handles]
        nread += sum(t.numel() * t.element_size() for t in ts)
        result[name] = ts[0]
        del ts
    t1 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    save_file(result, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = Path(model_dirs[0]) / "config.json"
    if cfg.exists():
        shutil.copy2(cfg, out / "config.json")
    t2 = time.perf_counter()
    return {
        "read_s": t1 - t0,
        "write_s": t2 - t1,
        "bytes_read": nread,
        "bytes_written": (out / "model.safetensors").stat().st_size,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--mode", choices=["raw", "safetensors"], default="raw")
    ap.add_argument("models", nargs="+", type=Path)
    a = ap.parse_args(argv)
    fn = io_floor_raw if a.mode == "raw" else io_floor_safetensors
    r = fn(a.models, a.out)
    print(
        f"[{a.mode}] read {r['bytes_read'] / 1e9:.2f} GB in {r['read_s']:.2f}s, "
        f"wrote {r['bytes_written'] / 1e9:.2f} GB in {r['write_s']:.2f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
