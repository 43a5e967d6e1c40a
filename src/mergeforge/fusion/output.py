"""Writing a fused model: one folder, atomically, never over an input.

``OUT/`` holds ``model.safetensors`` (+ its ``model.safetensors.index.json``, as every mergeforge
output), ``config.json`` (the model config the caller gives: for the vision suite the
architecture, as its parent folders have it), ``mergeforge_fusion.yml`` (the resolved fusion
config: method, parameters with their defaults filled in, parents, data, levels, seed, the
mergeforge version) and ``README.md`` (a model card). The folder is built through the checkpoint
writer's staging folder and renamed into place: a run that fails or is stopped (SIGINT/SIGTERM/
SIGHUP) leaves nothing at ``OUT``. The merge engine's output checks (``engine/output.py``) apply
unchanged: the output may not be, contain or lie inside an input, and ``overwrite`` replaces only
an empty folder or an earlier fused output holding nothing else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from mergeforge.errors import ValidationError

FUSION_CONFIG = "mergeforge_fusion.yml"
MARKERS = (FUSION_CONFIG, "model.safetensors.index.json")
"""Files every fused output has (what ``--overwrite`` recognises as an earlier fused output)."""
WRITTEN = ("README.md", "config.json")
"""Files fusion writes besides :data:`MARKERS` and the shards. Unlike a merge, fusion copies no
:data:`~mergeforge.checkpoint.CARRIED_FILES` (tokenizer, generation config...): in an earlier
fused output they are someone else's, and ``overwrite`` refuses rather than deleting them
(``carried=False`` in the engine's checks)."""


def _plain(value: object) -> object:
    """``value`` as YAML-safe builtins (tuples -> lists, tensors -> lists, paths -> str)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    return value


def to_yaml(doc: Mapping) -> str:
    """``doc`` as YAML in its own key order, block style except lists of numbers (one line)."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def seq(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
        flow = all(isinstance(v, (int, float)) for v in data)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)

    Dumper.add_representer(list, seq)
    return yaml.dump(_plain(doc), Dumper=Dumper, sort_keys=False, width=100)


def resolved_parameters(method: str, parameters: Mapping[str, object] | None) -> dict:
    """The method's parameters with every default filled in (an unknown method or parameter is a
    :class:`~mergeforge.errors.ConfigError` listing the valid ones)."""
    from mergeforge.fusion.base import get_method

    return _plain(get_method(method).make_params(parameters))


def fusion_card(config: Mapping, *, accuracy: Mapping[str, float] | None = None) -> str:
    """The fused model's ``README.md``: method and paper, parents, fusion set, accuracy (when
    known), and the resolved config."""
    import yaml

    from mergeforge.fusion.base import get_method
    from mergeforge.version import __version__

    spec = get_method(str(config["method"]))
    data = config.get("data") or {}
    parents = list(config.get("parents", []))
    front = {"library_name": "pytorch", "tags": ["fusion", "mergeforge"]}
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "# Fused model",
        "",
        f"Made with mergeforge {__version__} by fusing {len(parents)} independently trained "
        f"parents with **{spec.name}**: {spec.summary}.",
        "",
        f"Reference: {spec.reference}.",
        "",
        "- parents:",
        *[f"  - `{p}`" for p in parents],
    ]
    if config.get("architecture"):
        lines.append(f"- architecture: `{config['architecture']}`")
    lines.append(f"- fusion set: {_describe_data(data)}")
    if config.get("levels"):
        lines.append(f"- levels: {', '.join(f'`{x}`' for x in config['levels'])}")
    for name, acc in (accuracy or {}).items():
        lines.append(f"- test accuracy, {name}: {100 * acc:.2f} %")
    lines += ["", "## Configuration", "", "```yaml", to_yaml(config).rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _describe_data(data: Mapping) -> str:
    if "file" in data:
        return f"`{data['file']}`" + (f" ({data['n']} examples)" if "n" in data else "")
    if "dataset" not in data:
        return f"{data['n']} examples" if "n" in data else "not recorded"
    parts = [f"{k} {v}" for k, v in data.items() if k in ("dataset", "n", "seed")]
    source = data.get("from", "the training split")
    return ", ".join(parts) + f" (a class-stratified sample of {source})"


def is_previous_fused_output(folder: Path) -> bool:
    """``folder`` holds an earlier fused output (:data:`MARKERS`) and nothing fusion does not
    write: what ``overwrite`` may replace."""
    from mergeforge.engine import is_previous_output

    return is_previous_output(folder, markers=MARKERS, written=WRITTEN, carried=False)


def check_output(out: str | Path, inputs: Sequence[str | Path] = (), *, overwrite: bool) -> None:
    """The merge engine's output checks (``engine/output.py``) for a fused model, touching
    nothing: ``out`` can be created where it is, is not, does not contain and does not lie
    inside any of ``inputs``, and is absent, empty or (``overwrite``) an earlier fused output.
    :func:`write_fused` runs them; callers run them early, before any heavy work."""
    from mergeforge.engine import (
        check_not_among,
        check_output_location,
        check_replaceable,
        probe_writable,
    )

    out = Path(out)
    check_output_location(out)
    check_not_among(out, [(str(p), Path(p)) for p in inputs], producer="fusion")
    check_replaceable(
        out, overwrite=overwrite, producer="fusion", markers=MARKERS, written=WRITTEN, carried=False
    )
    probe_writable(out)


def write_fused(
    state_dict: Mapping[str, torch.Tensor],
    out_dir: str | Path,
    *,
    config: Mapping,
    card: str | None = None,
    model_config: Mapping | None = None,
    overwrite: bool = False,
    inputs: Sequence[str | Path] = (),
) -> Path:
    """Write ``state_dict`` as a fused model folder at ``out_dir`` (see the module docstring).

    ``config``: the resolved fusion config (``mergeforge_fusion.yml``; the mergeforge version is
    added). ``card``: README.md (default :func:`fusion_card`). ``model_config``: config.json
    (none written when None). ``inputs``: every file and folder the fusion read (parents, the
    data file); the output may not be, contain or lie inside any of them. Every check runs
    before anything is written; returns ``out_dir``.
    """
    import json

    from mergeforge.checkpoint import ShardedWriter
    from mergeforge.version import __version__

    tensors = _checked(state_dict)
    out = Path(out_dir)
    check_output(out, inputs, overwrite=overwrite)
    doc = {**_plain(config), "mergeforge_version": __version__}
    text = card if card is not None else fusion_card(doc)
    specs = [(k, t.shape, t.dtype) for k, t in tensors.items()]
    meta = {"mergeforge_fusion_method": str(config.get("method", ""))}
    with ShardedWriter(
        out,
        specs,
        max_shard_bytes=1 << 62,
        metadata=meta,
        overwrite=overwrite,
        durable=False,
        replaceable=is_previous_fused_output,
    ) as w:
        for key, t in tensors.items():
            w.write(key, t)
        if model_config is not None:
            w.write_text("config.json", json.dumps(_plain(model_config), indent=2) + "\n")
        w.write_text(FUSION_CONFIG, to_yaml(doc))
        w.write_text("README.md", text)
    return out


def _checked(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous copies-free views of the tensors; refuses an empty dict, non-tensors and
    NaN/Inf, naming the tensor (nothing is written)."""
    if not state_dict:
        raise ValidationError("write_fused: the state dict is empty; nothing to write")
    out = {}
    for key, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise ValidationError(
                f"write_fused: {key!r} is a {type(t).__name__}, not a tensor; pass a state dict"
            )
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValidationError(f"write_fused: tensor {key!r} contains NaN or Inf; not written")
        out[str(key)] = t.detach().to("cpu").contiguous()
    return out
