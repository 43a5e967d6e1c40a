"""The fusion config of ``mergeforge fuse CONFIG OUT``, checked before any heavy work.

A YAML file or a dict::

    method: kf                        # a fusion method (`mergeforge fuse --help` lists them)
    parameters: {}                    # the method's parameters (defaults filled in the output)
    parents:                          # files or folders of one architecture
      - runs/a/model.safetensors      # a safetensors file,
      - runs/b                        # a folder with model.safetensors (+ config.json: arch),
      - runs/c.pt                     # or a torch state dict (.pt/.bin/.pth, weights_only)
    architecture: vgg                 # mlp | vgg | resnet | vit; else the parents' config.json
    levels: [block1, block2, block3, fc, head]   # optional: overrides the architecture's
                                      # (or parameters.levels, checked and recorded alike)
    data: {dataset: fashion_mnist, n: 400, seed: 0}   # or {file: fusion.safetensors}
    class_fractions: [[...10 numbers...], [...]]      # optional, K×C (see FusionData)
    seed: 0                           # torch's seed for the method (k-means init, ...)

``data.dataset``: a class-stratified sample of ``n`` examples of the dataset's training split
(the vision suite's split, so its test subsample is never drawn). ``data.file``: a safetensors
file holding ``inputs`` (N×1×28×28, floating point) and optional ``labels`` (N, int64).
``class_fractions``: row k = parent k's share of each class among the parents' training
examples (columns sum to 1; non-IID parents); when absent, read from the vision cache's
``parent<k>.json`` if every parent comes from the suite, else uniform. Relative paths: from the
current folder, else from the YAML's folder. :func:`load_fuse_config` reads only YAML, JSON and
tensor headers; every error names the key or the file and the fix.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mergeforge.errors import ConfigError

KEYS = (
    "method",
    "parameters",
    "parents",
    "architecture",
    "levels",
    "data",
    "class_fractions",
    "seed",
)
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".bin", ".pth")
IMAGE = (1, 28, 28)
NUM_CLASSES = 10
DATA_EXAMPLE = "{dataset: fashion_mnist, n: 400, seed: 0} or {file: fusion.safetensors}"


@dataclass(frozen=True)
class FuseConfig:
    """A checked fusion config; paths resolved and absolute."""

    method: str
    parameters: Mapping[str, object]
    parents: tuple[Path, ...]
    architecture: str
    levels: tuple[str, ...]
    data: Mapping[str, object]  # {dataset, n, seed} or {file: Path, n}
    class_fractions: tuple[tuple[float, ...], ...] | None
    seed: int

    def inputs(self) -> list[Path]:
        """Every file and folder the fusion reads (the output may touch none of them)."""
        data = [Path(self.data["file"])] if "file" in self.data else []
        return [*self.parents, *data]

    def resolved(self) -> dict:
        """The config as written to ``mergeforge_fusion.yml``: parameters with defaults."""
        from mergeforge.fusion.output import resolved_parameters

        fractions = self.class_fractions
        return {
            "method": self.method,
            "parameters": resolved_parameters(self.method, self.parameters),
            "parents": [str(p) for p in self.parents],
            "architecture": self.architecture,
            "levels": list(self.levels),
            "data": {k: str(v) if isinstance(v, Path) else v for k, v in self.data.items()},
            "class_fractions": None if fractions is None else [list(r) for r in fractions],
            "seed": self.seed,
        }


def load_fuse_config(source: str | Path | Mapping) -> FuseConfig:
    """Parse and check a fusion config (a YAML path or text, or a dict); see the module
    docstring. Raises :class:`ConfigError` naming the key or file and the fix."""
    from mergeforge.fusion import get_method

    doc, where, root = _read(source)
    if unknown := sorted(set(doc) - set(KEYS)):
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {list(KEYS)}")
    for key in ("method", "parents", "data"):
        if doc.get(key) in (None, "", [], {}):
            raise ConfigError(f"{where}: '{key}' is missing; see `mergeforge fuse --help`")
    spec = get_method(str(doc["method"]))  # an unknown one lists the available ones
    parameters = doc.get("parameters") or {}
    if not isinstance(parameters, Mapping):
        raise ConfigError(f"{where}: parameters must be a mapping, got {parameters!r}")
    spec.make_params(parameters)  # unknown or invalid parameters name the valid ones
    if not isinstance(doc["parents"], list):
        raise ConfigError(f"{where}: parents must be a list of files or folders")
    parents = tuple(
        _resolve(p, root, f"{where}: parents[{i}]") for i, p in enumerate(doc["parents"])
    )
    k = len(parents)
    if k < spec.min_parents or (spec.max_parents is not None and k > spec.max_parents):
        most = "" if spec.max_parents is None else f" and at most {spec.max_parents}"
        raise ConfigError(
            f"{where}: {spec.name} fuses at least {spec.min_parents}{most} parents; "
            f"parents lists {k}"
        )
    if len(set(parents)) != k:
        raise ConfigError(f"{where}: a parent is listed twice; list each parent once")
    arch = _architecture(doc.get("architecture"), parents, where)
    _check_widths(arch, parents)
    own = parameters.get("levels")
    if doc.get("levels") is not None:
        levels = _levels(arch, doc.get("levels"), where)
        if own is not None and list(own) != list(levels):
            raise ConfigError(
                f"{where}: levels {list(levels)} and parameters.levels {list(own)} differ; give "
                "the levels once (the top-level key)"
            )
    else:  # the method's own levels parameter, checked and recorded as the top-level key would be
        own = list(own) if isinstance(own, tuple) else own
        levels = _levels(arch, own, where, key="parameters.levels")
    data = _data(doc["data"], root, where)
    fractions = _fractions(doc.get("class_fractions"), parents, where)
    seed = doc.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"{where}: seed must be an integer, got {seed!r}")
    return FuseConfig(spec.name, dict(parameters), parents, arch, levels, data, fractions, seed)


def _read(source: str | Path | Mapping) -> tuple[Mapping, str, Path | None]:
    """(the document, its name for errors, the folder relative paths may be in)."""
    import yaml

    if isinstance(source, Mapping):
        return dict(source), "fusion config", None
    path = Path(source)
    if path.suffix in (".yml", ".yaml") and not path.is_file():
        raise ConfigError(f"fusion config {str(path)!r}: no such file")
    where, root = (str(path), path.parent) if path.is_file() else ("fusion config", None)
    try:
        doc = yaml.safe_load(path.read_text() if path.is_file() else str(source))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {exc}") from None
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{where}: expected a mapping with method, parents and data")
    return doc, where, root


def _resolve(spec: object, root: Path | None, where: str, *, weights: bool = True) -> Path:
    path = Path(str(spec))
    if not path.exists() and root is not None and not path.is_absolute():
        path = root / path
    if not path.exists():
        raise ConfigError(
            f"{where}: {str(spec)!r} does not exist; give a .safetensors file, a model folder "
            "(model.safetensors + config.json) or a .pt/.bin state dict"
            if weights
            else f"{where}: {str(spec)!r} does not exist"
        )
    if weights and path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES):
        raise ConfigError(
            f"{where}: {str(spec)!r} is not a weights file ({', '.join(WEIGHT_SUFFIXES)}) "
            "or a model folder"
        )
    return path.absolute()


def _architecture(given: object, parents: Sequence[Path], where: str) -> str:
    """``architecture:`` or the one the parents' config.json files name; all must agree."""
    from mergeforge.evaluate.vision.models import ARCHS

    if given is not None and given not in ARCHS:
        raise ConfigError(f"{where}: architecture {given!r} is not one of {sorted(ARCHS)}")
    found = [
        (p, json.loads((p / "config.json").read_text()).get("arch"))
        for p in parents
        if (p / "config.json").is_file()
    ]
    found = [(p, a) for p, a in found if a is not None]
    if given is None and not found:
        raise ConfigError(
            f"{where}: no architecture: add 'architecture:' with one of {sorted(ARCHS)} (no "
            "parent has a config.json naming it)"
        )
    if given is not None:
        ref_name, ref = "architecture", given
    else:
        ref_name, ref = repr(str(found[0][0])), found[0][1]
    for p, arch in found:
        if arch != ref:
            raise ConfigError(
                f"{where}: parents of different architectures: {str(p)!r} is a {arch!r} model "
                f"(its config.json), {ref_name} is {ref!r}; fusion needs one architecture"
            )
    if ref not in ARCHS:
        raise ConfigError(f"{where}: architecture {ref!r} is not one of {sorted(ARCHS)}")
    return ref


def _check_widths(arch: str, parents: Sequence[Path]) -> None:
    """Every parent holds the architecture's tensors with its shapes (headers only)."""
    from mergeforge.checkpoint import open_checkpoint
    from mergeforge.evaluate.vision.models import build_model
    from mergeforge.fusion.base import level_of

    model = build_model(arch)
    ref, levels = model.state_dict(), tuple(model.levels)
    for p in parents:
        ck = open_checkpoint(p)  # a Path: never read as a Hub id
        try:
            shapes = {k: tuple(ck.info(k).shape) for k in ck.keys()}
        finally:
            ck.close()
        missing, extra = sorted(set(ref) - set(shapes)), sorted(set(shapes) - set(ref))
        if missing or extra:
            raise ConfigError(
                f"parent {str(p)!r} is not a {arch!r} model of the vision suite (missing "
                f"{missing[:4]}, extra {extra[:4]}); parents of different architectures cannot "
                "be fused"
            )
        for key, t in ref.items():
            if shapes[key] != tuple(t.shape):
                raise ConfigError(
                    f"parent {str(p)!r}: tensor {key!r} (level {level_of(key, levels)!r}) has "
                    f"shape {shapes[key]}, the {arch!r} architecture {tuple(t.shape)}; parents "
                    "of different widths cannot be fused"
                )


def _levels(arch: str, given: object, where: str, *, key: str = "levels") -> tuple[str, ...]:
    """The architecture's levels, or ``levels:`` (``key``: where the list was given, e.g.
    ``parameters.levels``) checked to name modules whose composition, in order, is the forward
    pass (:func:`mergeforge.fusion.levels.levels_of` on a zero batch)."""
    import torch

    from mergeforge.errors import ValidationError
    from mergeforge.evaluate.vision.models import build_model
    from mergeforge.fusion.levels import levels_of

    model = build_model(arch)
    if given is None:
        return tuple(model.levels)
    if not isinstance(given, list) or not given or not all(isinstance(x, str) for x in given):
        raise ConfigError(f"{where}: {key} must be a non-empty list of module names")
    try:
        levels_of(model, given, sample=torch.zeros(2, *IMAGE))
    except ValidationError as exc:
        raise ConfigError(
            f"{where}: {key} {given} do not fit the {arch!r} architecture: {exc} (its default "
            f"levels: {list(model.levels)})"
        ) from None
    return tuple(given)


def _data(spec: object, root: Path | None, where: str) -> dict:
    from mergeforge.evaluate.vision.suite import DATASETS

    if not isinstance(spec, Mapping) or ("file" in spec) == ("dataset" in spec):
        raise ConfigError(f"{where}: data must be {DATA_EXAMPLE}, got {spec!r}")
    if "file" in spec:
        if set(spec) != {"file"}:
            raise ConfigError(f"{where}: data: a file takes no other key, got {sorted(spec)}")
        path = _resolve(spec["file"], root, f"{where}: data.file", weights=False)
        return {"file": path, "n": check_data_file(path)}
    if unknown := sorted(set(spec) - {"dataset", "n", "seed"}):
        raise ConfigError(f"{where}: data: unknown key(s) {unknown}; {DATA_EXAMPLE}")
    if spec["dataset"] not in DATASETS:
        raise ConfigError(f"{where}: data.dataset {spec['dataset']!r} is not one of {DATASETS}")
    n, seed = spec.get("n", 400), spec.get("seed", 0)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(
            f"{where}: data.n must be a positive number of examples, got {n!r} (an empty "
            "fusion set fuses nothing; a few hundred suffice)"
        )
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"{where}: data.seed must be an integer, got {seed!r}")
    return {"dataset": spec["dataset"], "n": n, "seed": seed}


def check_data_file(path: Path) -> int:
    """Check a fusion-set file's header (``inputs`` N×1×28×28 floating point, N >= 1; optional
    ``labels`` N int64) without reading its data; returns N."""
    from safetensors import SafetensorError, safe_open

    shape_text = "×".join(map(str, IMAGE))
    fix = (
        "save it with safetensors.torch.save_file({'inputs': x.float(), 'labels': y.long()}, "
        f"...), x being N×{shape_text}"
    )
    if not path.name.endswith(".safetensors"):
        raise ConfigError(f"data.file {str(path)!r}: not a .safetensors file; {fix}")
    try:
        with safe_open(str(path), "pt") as f:
            info = {
                k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()
            }
    except (SafetensorError, OSError) as exc:
        raise ConfigError(
            f"data.file {str(path)!r}: not a readable safetensors file ({exc})"
        ) from None
    if "inputs" not in info:
        raise ConfigError(
            f"data.file {str(path)!r} has no 'inputs' tensor (it holds {sorted(info)}); {fix}"
        )
    shape, dtype = info["inputs"]
    if dtype not in ("F16", "BF16", "F32", "F64"):
        raise ConfigError(
            f"data.file {str(path)!r}: inputs is {dtype}, not floating point (images scaled "
            f"to [0, 1]); {fix}"
        )
    if len(shape) != 4 or shape[1:] != IMAGE or shape[0] < 1:
        what = "empty (no rows)" if len(shape) == 4 and shape[0] == 0 else f"shaped {shape}"
        raise ConfigError(
            f"data.file {str(path)!r}: inputs is {what}, the vision models take N×{shape_text} "
            f"with N >= 1; {fix}"
        )
    if "labels" in info and info["labels"] != ((shape[0],), "I64"):
        got = f"{info['labels'][1]} {info['labels'][0]}"
        raise ConfigError(f"data.file {str(path)!r}: labels is {got}, not int64 ({shape[0]},)")
    return shape[0]


def _fractions(given: object, parents: Sequence[Path], where: str):
    k = len(parents)
    if given is None:
        return cached_class_share(parents)
    rows = given if isinstance(given, list) else []
    shaped = len(rows) == k and all(isinstance(r, list) and len(r) == NUM_CLASSES for r in rows)
    numbers = shaped and all(
        isinstance(v, (int, float)) and 0 <= v < float("inf") for r in rows for v in r
    )
    if not numbers:
        raise ConfigError(
            f"{where}: class_fractions must be {k}×{NUM_CLASSES} non-negative numbers (row k: "
            "parent k's share of each class)"
        )
    return tuple(tuple(float(v) for v in r) for r in rows)


def cached_class_share(parents: Sequence[Path]) -> tuple[tuple[float, ...], ...] | None:
    """Each parent's class share from the vision cache's ``parent<k>.json`` when every parent
    is a suite parent (``<recipe>/models/parent<k>/`` or ``<recipe>/parent<k>.safetensors``),
    else None."""
    rows = []
    for p in parents:
        if p.is_dir() and (p / "config.json").is_file():
            k = json.loads((p / "config.json").read_text()).get("parent")
            meta = p.parent.parent / f"parent{k}.json"
        else:
            meta = p.with_suffix(".json")
        info = json.loads(meta.read_text()) if meta.is_file() else {}
        if "class_share" not in info:
            return None
        rows.append(tuple(float(v) for v in info["class_share"]))
    return tuple(rows)
