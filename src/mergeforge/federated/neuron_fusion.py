"""``aggregator: {name: neuron_fusion}``: each round, the clients' models fused neuron by neuron.

FedAvg averages the clients' weights entry by entry, as if neuron i of one client computed what
neuron i of every other does; after local training on skewed data they drift apart (FedMA,
Wang et al. 2020, arXiv:2002.06440, matches them before averaging). Here the round's new global
model is the neuron-centric fusion of the clients' returned models (2507.00037, ALGORITHMS.md
§5), run by :func:`mergeforge.fusion.fuse` — the code of ``mergeforge fuse``, nothing copied:
level by level, the clients' neurons (their activations on a fusion set) are grouped — KF:
importance-weighted k-means of the K clients' pooled neurons into the level's width (the
default); HF: Hungarian pairing, exactly two clients — and the level is fitted to the groups'
weighted means (closed form at affine levels; ``fit: gradient`` for every level). The global
model the clients started from takes no part (it is neither a parent nor a base).

**The fusion set** (:func:`server_fusion_set`) is held by the server: ``fusion_examples``
(default 200) class-stratified examples of the run's training set (``load_data`` of
``client.py``, the set ``partition.py`` cuts among the clients), drawn with the run's ``seed``
by the vision suite's :func:`~mergeforge.evaluate.vision.fuse.fusion_set`, labels included (the
targets of the attribution importances). This assumes the server holds a small public or proxy
sample of the task's inputs, as the fusion paper and the FL-distillation methods (FedDF, Lin et
al. 2020, arXiv:2006.07242) do; here it is drawn from the pool the clients' partitions come
from, so it overlaps their data.

**Client weights.** The fusion API takes one per-parent weight: ``class_fractions`` (K×C), the
weights of the head's target logits (each column normalised over the clients). Row k is client
k's aggregation weight w_k (its share of the round's examples, or 1/K with ``weighting:
uniform``) for every class (``class_fractions: weights``, the default), or w_k times client k's
own class distribution (``class_fractions: reported``: each client also sends its per-class
example counts, a ``stats.class_counts`` record; with ``weighting: examples`` row k is then
client k's count of each class — the fusion's non-IID head). The hidden levels are not weighted
by client: the API has no per-parent weight there (each client's neuron importances sum to 1).

Everything else in ``parameters`` is the fusion method's own (``importance``, ``fit``,
``kmeans_iters``, ``ridge``, ...; :class:`~mergeforge.fusion.neuron.KFParams`), passed through;
its ``seed`` (k-means++, gradient shuffles) is ``seed·100003 + round`` unless given, and its
``ridge`` is :data:`DEFAULT_RIDGE` (1e-2) unless given. The fusion's own 1e-10 fits each level
on 200 examples almost without regularisation, and round after round the global model's weights
grow (to 1e14 on MNIST) until the clients' SGD diverges and the model falls to chance, within 3-15
rounds; at 1e-4 this still happens in every non-IID run measured, and at 1e-3 three of four
non-IID runs end 6 to 56 points below their best round. 1e-2
is the smallest ridge of the sweep that never collapsed (Fashion-MNIST and MNIST, IID and
Dirichlet 0.1 / 0.5, 20 rounds); it costs 4-6 points against 1e-4 in the IID runs, and 1e-1
loses 10-20 points everywhere. BENCHMARKS.md §10 has the sweep.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch

from mergeforge.config import check_int, check_keys
from mergeforge.errors import ConfigError, ValidationError

if TYPE_CHECKING:
    from torch import Tensor, nn

    from mergeforge.federated.aggregate import ClientUpdate
    from mergeforge.fusion import FusionData

NAME = "neuron_fusion"
GROUPINGS = ("kf", "hf")
"""The grouping of the clients' neurons = the fusion method of :mod:`mergeforge.fusion`."""
CLASS_FRACTIONS = ("weights", "reported")
CLASS_COUNTS = "class_counts"
"""The statistics kind (and tensor name) of ``class_fractions: reported``."""
DEFAULT_EXAMPLES = 200
DEFAULT_RIDGE = 1e-2
"""The closed-form fits' relative ridge unless ``parameters.ridge`` is given (the fusion's own
default, 1e-10, is for one fusion of trained parents; the module docstring says why 1e-2)."""
OWN_KEYS = ("grouping", "fusion_examples", "class_fractions")
WHERE = "aggregator.parameters"


@dataclass(frozen=True)
class FusionSettings:
    """``aggregator.parameters`` of ``neuron_fusion``, checked."""

    grouping: str = "kf"
    examples: int = DEFAULT_EXAMPLES
    class_fractions: str = "weights"
    params: Mapping[str, Any] = field(default_factory=dict)
    """The fusion method's parameters, as given (the method's defaults fill the rest)."""

    @property
    def min_clients(self) -> int:
        return 2 if self.grouping == "hf" else 1

    @property
    def stats(self) -> str | None:
        return CLASS_COUNTS if self.class_fractions == "reported" else None

    @property
    def label(self) -> str:
        """``neuron_fusion``, or with what differs from the defaults:
        ``neuron_fusion(hf, conductance, reported)``."""
        parts = [] if self.grouping == "kf" else [self.grouping]
        if self.params.get("fit") == "gradient":
            parts.append("gradient")
        if self.params.get("importance", "uniform") != "uniform":
            parts.append(str(self.params["importance"]))
        if self.class_fractions == "reported":
            parts.append("reported")
        return NAME + (f"({', '.join(parts)})" if parts else "")


def _choice(value: Any, choices: tuple[str, ...], key: str) -> str:
    if value not in choices:
        raise ConfigError(f"{WHERE}.{key}: {value!r} is not one of {', '.join(choices)}")
    return value


def _check_type(key: str, value: Any, default: Any) -> Any:
    """The YAML value of a fusion parameter against the type of its default (the parameter
    classes check ranges, not types); lists become tuples (``levels``)."""
    where = f"{WHERE}.{key}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        value = float(value)
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
    elif value is not None:  # levels: None or module names
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of module names, got {value!r}")
        value = tuple(value)
    return value


def parse_fusion_parameters(raw: Mapping[str, Any] | None) -> FusionSettings:
    """``aggregator.parameters`` of ``neuron_fusion`` as :class:`FusionSettings`; every error
    names the parameter (``aggregator.parameters.importance: ...``)."""
    from mergeforge.fusion import get_method

    raw = dict(raw or {})
    grouping = _choice(raw.pop("grouping", "kf"), GROUPINGS, "grouping")
    examples = check_int(raw.pop("fusion_examples", DEFAULT_EXAMPLES), f"{WHERE}.fusion_examples",
                         1)  # fmt: skip
    fractions = _choice(raw.pop("class_fractions", "weights"), CLASS_FRACTIONS,
                        "class_fractions")  # fmt: skip
    method = get_method(grouping)
    fields = {f.name: f.default for f in dataclasses.fields(method.params)}
    check_keys(raw, set(fields) | set(OWN_KEYS), f"{WHERE} (neuron_fusion, grouping {grouping})",
               see="the README's 'Federated learning'")  # fmt: skip
    params = {k: _check_type(k, v, fields[k]) for k, v in raw.items()}
    try:
        method.make_params(params)  # the method's own range checks
    except ConfigError as e:
        raise ConfigError(f"{WHERE}: {e}") from None
    return FusionSettings(grouping, examples, fractions, params)


# ------------------------------------------------------------------ the server's fusion set


@lru_cache(maxsize=2)
def server_fusion_set(
    dataset: str, n_train: int | None, n_test: int | None, seed: int, n: int
) -> FusionData:
    """``n`` class-stratified examples (inputs and labels) of the run's training set, drawn
    with ``seed``: the data the clients are partitioned from, loaded as they load it."""
    from mergeforge.evaluate.vision.fuse import fusion_set
    from mergeforge.federated.client import load_data

    data = load_data(dataset, n_train, n_test, seed)
    return fusion_set(data.train_x, data.train_y, n, seed=seed)


# ------------------------------------------------------------------ one round


def class_fractions(
    settings: FusionSettings, updates: Sequence[ClientUpdate], weights: Sequence[float],
    classes: int,
) -> Tensor:  # fmt: skip
    """The K×C ``class_fractions`` of a round (see the module docstring)."""
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if settings.class_fractions == "weights":
        return w[:, None].expand(len(w), classes).clone()
    rows = []
    for u in updates:
        counts = (u.stats or {}).get(CLASS_COUNTS)
        if counts is None or tuple(counts.shape) != (classes,):
            got = None if counts is None else tuple(counts.shape)
            raise ValidationError(f"{u.name}'s class counts have shape {got}; the model has "
                                  f"{classes} classes")  # fmt: skip
        counts = counts.to(torch.float64)
        rows.append(counts / counts.sum())
    return w[:, None] * torch.stack(rows)


def fuse_round(
    settings: FusionSettings,
    global_sd: Mapping[str, Tensor],
    updates: Sequence[ClientUpdate],
    weights: Sequence[float],
    *,
    data: FusionData,
    make_model: Callable[[], nn.Module],
    seed: int,
) -> dict[str, Tensor]:
    """The clients' models fused by :func:`mergeforge.fusion.fuse` on ``data`` (the server's
    fusion set): the next global model, with the global model's keys and dtypes."""
    from mergeforge.fusion import FusionData, fuse

    parents = []
    for u in updates:
        model = make_model()
        model.load_state_dict(dict(u.state_dict))
        parents.append(model.eval())
    with torch.no_grad():
        classes = int(parents[0](data.inputs[:1]).shape[-1])
    fractions = class_fractions(settings, updates, weights, classes)
    params = {"seed": int(seed), "ridge": DEFAULT_RIDGE, **settings.params}
    fused = fuse(parents, FusionData(data.inputs, data.labels, fractions), settings.grouping,
                 params, names=[u.name for u in updates])  # fmt: skip
    if set(fused) != set(global_sd):
        raise ValidationError("neuron_fusion: the model built for the fusion does not have the "
                              "global model's tensors")  # fmt: skip
    return {k: fused[k].to(global_sd[k].dtype) for k in global_sd}
