"""A round's aggregation: the clients' models merged onto the global model by any merge method.

The round's global model is the base, each client's returned model an expert, and the merge
runs through :func:`mergeforge.engine.merge_state_dicts` — the engine of ``mergeforge merge``,
so a round's result equals ``mergeforge merge`` on the same models saved to disk (tested).
Each client's per-model ``weight`` is its share n_k / Σ n of the round's examples (``weighting:
uniform``: 1/K), so ``linear`` is FedAvg (McMahan et al. 2017, arXiv:1602.05629, Alg. 1:
θ ← Σ_k n_k/n θ_k) and ``task_arithmetic`` with λ = 1 is too (θ_g + Σ_k w_k (θ_k − θ_g)); TIES,
DARE or a covariance merge change how the task vectors θ_k − θ_g combine (Tao et al., TMLR
2025, port FL aggregation to task vectors the other way round). Methods without a per-model
``weight`` (SWUDI, TSV-M, ...) merge the clients as equals. ``median`` / ``trimmed_mean``
(``robust.py``) ignore the base and the weights; ``neuron_fusion`` (``neuron_fusion.py``) fuses
the clients' models neuron by neuron on the server's fusion set, the weights entering its head.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor

from mergeforge.errors import ConfigError
from mergeforge.federated.config import AggregatorSpec, FederatedConfig
from mergeforge.federated.robust import robust_state_dict

if TYPE_CHECKING:
    from torch import nn

    from mergeforge.fusion import FusionData

GLOBAL = "global"
"""The global model's name in the merge document."""


@dataclass(frozen=True)
class ClientUpdate:
    """One client's accepted reply: its model, example count, metrics and statistics."""

    name: str
    """``client<partition id>`` (else ``node<node id>``): the model's name in the merge."""
    node_id: int
    state_dict: Mapping[str, Tensor]
    num_examples: float
    metrics: Mapping[str, float] = field(default_factory=dict)
    stats: Mapping[str, Tensor] | None = None
    """Per-tensor statistics of ``spec.stats`` (RegMean: input Grams), keyed by tensor name."""


def merge_document(
    spec: AggregatorSpec, names: Sequence[str], weights: Sequence[float], *, seed: int = 0
) -> dict[str, Any]:
    """The merge config of one round (mergekit-style mapping, as ``mergeforge merge`` reads):
    ``base_model: global`` unless the method takes no base (``linear``), each client a model
    with its ``model_parameters`` and, where the method has one, its ``weight``."""
    from mergeforge.methods import get_method

    method = get_method(spec.method)
    has_weight = "weight" in method.param_fields()["per_model"]
    models = []
    for name, w in zip(names, weights, strict=True):
        params = dict(spec.model_parameters)
        if has_weight:
            params["weight"] = float(w)
        models.append({"model": name, "parameters": params})
    doc: dict[str, Any] = {"merge_method": method.name, "models": models, "seed": int(seed)}
    if method.base != "none":
        doc["base_model"] = GLOBAL
    if spec.parameters:
        doc["parameters"] = dict(spec.parameters)
    return doc


@dataclass(frozen=True)
class Aggregator:
    """``aggregator(global_sd, updates, server_round) -> new global state dict``.

    ``neuron_fusion`` also needs ``fusion_data`` (the server's fusion set, or a function
    returning it, called at the first round) and ``make_model`` (a fresh module of the clients'
    architecture, its ``levels`` declared); :meth:`from_config` gives both."""

    spec: AggregatorSpec
    seed: int = 0
    fusion_data: FusionData | Callable[[], FusionData] | None = None
    make_model: Callable[[], nn.Module] | None = None

    def __post_init__(self) -> None:
        if self.spec.fusion is not None and (self.fusion_data is None or self.make_model is None):
            raise ConfigError(
                "aggregator: neuron_fusion needs the server's fusion set and the clients' "
                "architecture: Aggregator(spec, fusion_data=FusionData(...), make_model=...) "
                "or Aggregator.from_config(cfg)"
            )

    @classmethod
    def from_config(cls, cfg: FederatedConfig) -> Aggregator:
        fusion = cfg.aggregator.fusion
        if fusion is None:
            return cls(cfg.aggregator, cfg.seed)
        from mergeforge.federated.client import make_model
        from mergeforge.federated.neuron_fusion import server_fusion_set

        data = functools.partial(server_fusion_set, cfg.dataset, cfg.n_train, cfg.n_test,
                                 cfg.seed, fusion.examples)  # fmt: skip
        return cls(cfg.aggregator, cfg.seed, fusion_data=data,
                   make_model=functools.partial(make_model, cfg))  # fmt: skip

    @property
    def min_models(self) -> int:
        """Clients a round needs (model_stock, neuron_fusion with hf: 2); fewer keep the
        global model."""
        if self.spec.fusion is not None:
            return self.spec.fusion.min_clients
        if self.spec.method is None:
            return 1
        from mergeforge.methods import get_method

        return get_method(self.spec.method).min_models

    def weights(self, updates: Sequence[ClientUpdate]) -> list[float]:
        if self.spec.weighting == "uniform":
            return [1.0 / len(updates)] * len(updates)
        total = float(sum(u.num_examples for u in updates))
        return [float(u.num_examples) / total for u in updates]

    def document(self, updates: Sequence[ClientUpdate], server_round: int) -> dict[str, Any]:
        """The round's merge config; stochastic methods (DARE) get a new seed each round."""
        return merge_document(self.spec, [u.name for u in updates], self.weights(updates),
                              seed=self.seed * 100_003 + server_round)  # fmt: skip

    def __call__(
        self, global_sd: Mapping[str, Tensor], updates: Sequence[ClientUpdate], server_round: int
    ) -> dict[str, Tensor]:
        if self.spec.name in ("median", "trimmed_mean"):
            return robust_state_dict([dict(u.state_dict) for u in updates],
                                     kind=self.spec.name, beta=self.spec.beta)  # fmt: skip
        if self.spec.fusion is not None:
            from mergeforge.federated.neuron_fusion import fuse_round

            data = self.fusion_data() if callable(self.fusion_data) else self.fusion_data
            return fuse_round(self.spec.fusion, global_sd, updates, self.weights(updates),
                              data=data, make_model=self.make_model,
                              seed=self.seed * 100_003 + server_round)  # fmt: skip
        from mergeforge.engine import merge_state_dicts

        models = {GLOBAL: global_sd, **{u.name: u.state_dict for u in updates}}
        stats = None
        if self.spec.stats is not None:
            stats = {u.name: {self.spec.stats: dict(u.stats or {})} for u in updates}
        return merge_state_dicts(self.document(updates, server_round), models, stats=stats,
                                 workers=1)  # fmt: skip
