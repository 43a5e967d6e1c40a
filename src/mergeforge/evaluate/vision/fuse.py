"""``mergeforge fuse CONFIG OUT``: fuse independently trained vision models as a YAML says.

It lives with the vision domain, above :mod:`mergeforge.fusion`, because it builds the vision
suite's architectures and samples its datasets. The config and its checks are
:mod:`~mergeforge.evaluate.vision.fuse_config`; the fusion itself is
:func:`mergeforge.fusion.fuse`, the output :func:`mergeforge.fusion.output.write_fused`.
:func:`fuse_from_config` is what the command runs; :func:`fuse_to_folder` is shared with
``mergeforge bench vision``'s fusion rows. When the fusion set comes from a dataset, the card and
``mergeforge_fusion.yml`` (``result:``) report the fused model's and the parents' accuracy on the
suite's test subsample.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from mergeforge.evaluate.vision.fuse_config import NUM_CLASSES, load_fuse_config

__all__ = [
    "fuse_from_config",
    "fuse_to_folder",
    "fusion_set",
    "load_fuse_config",
    "model_config",
    "vision_parents",
]


def model_config(arch: str) -> dict:
    """``config.json`` of a fused vision model (what ``read_state_dict`` / ``load_into`` read)."""
    return {
        "model_type": f"mergeforge-vision-{arch}",
        "arch": arch,
        "num_classes": NUM_CLASSES,
        "fused": True,
    }


def vision_parents(arch: str, state_dicts: Sequence[Mapping], levels: Sequence[str] | None = None):
    """The parents as eval-mode modules of ``arch``; ``levels`` overrides the class's list (the
    attribute :mod:`mergeforge.fusion` reads)."""
    from mergeforge.evaluate.vision.train import load_into

    models = []
    for sd in state_dicts:
        model = load_into(arch, {k: v.float() for k, v in sd.items()})
        if levels is not None:
            model.levels = tuple(levels)
        models.append(model.eval())
    return models


def fusion_set(x, y, n: int, *, seed: int, class_fractions=None):
    """A :class:`~mergeforge.fusion.FusionData` of ``n`` class-stratified examples of ``(x, y)``
    (N×1×28×28, N), drawn with ``seed``; ``class_fractions`` K×C (or None)."""
    import torch

    from mergeforge.evaluate.vision.data import stratified_subset
    from mergeforge.fusion import FusionData

    idx = torch.as_tensor(stratified_subset(y.numpy(), n, seed=seed))
    return FusionData(inputs=x[idx], labels=y[idx], class_fractions=_tensor(class_fractions))


def fuse_to_folder(
    arch: str,
    state_dicts: Sequence[Mapping],
    names: Sequence[str],
    data,
    method: str,
    parameters: Mapping[str, object],
    out: Path,
    *,
    config: Mapping,
    levels: Sequence[str] | None = None,
    seed: int = 0,
    overwrite: bool = False,
    inputs: Sequence[Path] = (),
    device: str | None = None,
    test=None,
) -> dict:
    """Fuse ``state_dicts`` (models of ``arch``, named ``names`` in errors) on ``data`` (a
    ``FusionData``) and write the folder ``out`` with ``config`` as its resolved config. Returns
    ``{"fusion_seconds"}``, plus ``"test_accuracy"`` and ``"parents_test_accuracy"`` when
    ``test = (x, y)`` is given. Arguments are picklable: the bench runs it in a fresh process."""
    import torch

    from mergeforge.device import resolve_device
    from mergeforge.evaluate.metrics import accuracy
    from mergeforge.evaluate.vision.train import load_into, predict_logits
    from mergeforge.fusion import FusionData, fuse
    from mergeforge.fusion.output import check_output, fusion_card, write_fused

    check_output(out, inputs, overwrite=overwrite)
    dev = resolve_device(device)
    models = [m.to(dev) for m in vision_parents(arch, state_dicts, levels)]
    on_dev = [None if t is None else t.to(dev) for t in (data.labels, data.class_fractions)]
    data = FusionData(data.inputs.to(dev), *on_dev)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    fused = {k: v.cpu() for k, v in fuse(models, data, method, parameters, names=names).items()}
    result = {"fusion_seconds": round(time.perf_counter() - t0, 3)}
    shown = None
    if test is not None:

        def score(sd: Mapping) -> float:
            return accuracy(predict_logits(load_into(arch, sd), test[0]), test[1])

        result["test_accuracy"] = score(fused)
        result["parents_test_accuracy"] = [score(sd) for sd in state_dicts]
        shown = {"fused": result["test_accuracy"]}
        shown |= {f"parent {k}": a for k, a in enumerate(result["parents_test_accuracy"])}
    doc = {**config, "result": result}
    card = fusion_card(doc, accuracy=shown)
    write_fused(
        fused,
        out,
        config=doc,
        card=card,
        model_config=model_config(arch),
        overwrite=overwrite,
        inputs=inputs,
    )
    return result


def fuse_from_config(
    config: str | Path | Mapping,
    out: str | Path,
    *,
    overwrite: bool = False,
    device: str | None = None,
    console=None,
) -> Path:
    """``mergeforge fuse CONFIG OUT`` from Python: check the config
    (:func:`~mergeforge.evaluate.vision.fuse_config.load_fuse_config`) and the output, load the
    parents (NaN checked) and the fusion set, fuse, and write ``out`` atomically; returns it."""
    from safetensors.torch import load_file

    from mergeforge.device import resolve_device
    from mergeforge.evaluate.vision.data import load_dataset
    from mergeforge.evaluate.vision.suite import recipe_for
    from mergeforge.fusion import FusionData
    from mergeforge.fusion.base import check_parents
    from mergeforge.fusion.output import check_output

    out = Path(out)
    dev = resolve_device(device)  # a bad --device (or auto) before the parents and data load
    cfg = load_fuse_config(config)
    check_output(out, cfg.inputs(), overwrite=overwrite)  # before any heavy work
    states = [_read(p) for p in cfg.parents]
    names = [str(p) for p in cfg.parents]
    # NaN/Inf in a parent, named with its level, before the fusion set is loaded
    check_parents(vision_parents(cfg.architecture, states, cfg.levels), names=names)
    test = None
    if "file" in cfg.data:
        t = load_file(str(cfg.data["file"]))
        data = FusionData(t["inputs"].float(), t.get("labels"), _tensor(cfg.class_fractions))
    else:  # the suite's split: its test subsample is never in the fusion set
        n_test = recipe_for(cfg.data["dataset"], cfg.architecture, "seeds2").n_test
        split = load_dataset(cfg.data["dataset"], n_train=None, n_test=n_test, seed=0)
        data = fusion_set(
            split.train_x,
            split.train_y,
            cfg.data["n"],
            seed=cfg.data["seed"],
            class_fractions=cfg.class_fractions,
        )
        test = (split.test_x, split.test_y)
    if console is not None:
        console.print(
            f"fusing {len(states)} {cfg.architecture} parents with {cfg.method} on "
            f"{len(data)} examples"
        )
    result = fuse_to_folder(
        cfg.architecture,
        states,
        names,
        data,
        cfg.method,
        cfg.parameters,
        out,
        config=cfg.resolved(),
        levels=cfg.levels,
        seed=cfg.seed,
        overwrite=overwrite,
        inputs=cfg.inputs(),
        device=str(dev),
        test=test,
    )
    if console is not None:
        acc = result.get("test_accuracy")
        scored = "" if acc is None else f"; test accuracy {100 * acc:.2f} %"
        console.print(f"wrote {out} ({cfg.method}) in {result['fusion_seconds']:.1f} s{scored}")
    return out


def _read(path: Path) -> dict:
    """Every tensor of a parent (file or folder) as float32 CPU tensors."""
    import torch

    from mergeforge.checkpoint import open_checkpoint

    ck = open_checkpoint(path)  # a Path: never parsed as a Hub id
    try:
        return {k: ck.get(k).to(torch.float32) for k in ck.keys()}
    finally:
        ck.close()


def _tensor(rows):
    import torch

    return None if rows is None else torch.as_tensor(rows, dtype=torch.float32)
