"""Read a round's replies, one client at a time: a bad reply is dropped, never the round.

Flower's FedAvg refuses a whole round when one reply's keys differ from the others
(``validate_message_reply_consistency`` raises ``InconsistentMessageReplies``) and averages a
NaN into the global model. Here each reply is checked on its own against the model the server
sent; one that fails is left out of the round with the reason, naming the client:

* an error reply (the ClientApp raised, the node died or was cut off);
* no ``arrays`` ArrayRecord, or arrays that cannot be read as tensors;
* no positive finite ``num-examples`` in its MetricRecord;
* missing or unexpected tensor names, a tensor of the wrong shape, or a non-finite entry;
* statistics the aggregator needs (RegMean Grams; neuron_fusion's class counts) missing or
  malformed.

A sampled client that sent nothing before the round's timeout is reported by the strategy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from flwr.app import ArrayRecord, Message
from torch import Tensor

from mergeforge.federated.aggregate import ClientUpdate
from mergeforge.federated.neuron_fusion import CLASS_COUNTS

WEIGHT_KEY = "num-examples"
CLIENT_RECORD = "client"
"""ConfigRecord of a train reply naming the client (``partition-id``)."""
STATS_PREFIX = "stats."
"""A statistics ArrayRecord is named ``stats.<kind>`` (``stats.regmean``)."""


class BadReply(Exception):
    """Why one reply is left out (the message names what is wrong and where)."""


def partition_id(msg: Message) -> int | None:
    """The partition a reply says it trained on (``None``: an error reply, or a client that
    does not say)."""
    try:
        return int(msg.content[CLIENT_RECORD]["partition-id"])
    except Exception:
        return None


def client_name(msg: Message) -> str:
    """``client<partition id> (node <id>)`` when the reply says its partition, else the node."""
    pid, node = partition_id(msg), msg.metadata.src_node_id
    return f"client{pid} (node {node})" if pid is not None else f"node {node}"


def _short(names: Iterable[str], n: int = 3) -> str:
    names = sorted(names)
    return ", ".join(repr(x) for x in names[:n]) + (f" and {len(names) - n} more" if
                                                    len(names) > n else "")  # fmt: skip


def check_tensors(sd: Mapping[str, Tensor], reference: Mapping[str, Tensor], what: str) -> None:
    """Same names and shapes as ``reference``, every entry finite; else :class:`BadReply`."""
    missing, extra = set(reference) - set(sd), set(sd) - set(reference)
    if missing:
        raise BadReply(f"{what} lacks {len(missing)} tensor(s) of the global model: "
                       f"{_short(missing)}")  # fmt: skip
    if extra:
        raise BadReply(f"{what} has {len(extra)} tensor(s) the global model lacks: "
                       f"{_short(extra)}")  # fmt: skip
    for k, ref in reference.items():
        t = sd[k]
        if tuple(t.shape) != tuple(ref.shape):
            raise BadReply(f"{what}: {k!r} has shape {tuple(t.shape)}, the global model's is "
                           f"{tuple(ref.shape)}")  # fmt: skip
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise BadReply(f"{what}: {k!r} has {bad} non-finite value(s) (NaN or Inf)")


def _arrays(msg: Message, key: str, what: str) -> dict[str, Tensor]:
    try:
        record = msg.content.array_records[key]
    except KeyError:
        raise BadReply(f"no {what} ArrayRecord {key!r} in the reply") from None
    if not isinstance(record, ArrayRecord):
        raise BadReply(f"{key!r} is not an ArrayRecord")
    try:
        return dict(record.to_torch_state_dict())
    except Exception as e:  # a corrupt or non-numeric array
        raise BadReply(f"its {what} cannot be read as tensors: {type(e).__name__}: {e}") from None


def _check_class_counts(stats: Mapping[str, Tensor]) -> None:
    """neuron_fusion's ``class_counts``: one vector of finite, non-negative counts, not all 0."""
    if set(stats) != {CLASS_COUNTS}:
        raise BadReply(f"its class-count statistics hold {_short(stats)}, not {CLASS_COUNTS!r}")
    c = stats[CLASS_COUNTS]
    if c.ndim != 1 or len(c) == 0:
        raise BadReply(f"its class counts have shape {tuple(c.shape)}, not (classes,)")
    c = c.double()
    if not bool(torch.isfinite(c).all()) or bool((c < 0).any()) or float(c.sum()) <= 0:
        raise BadReply("its class counts are not finite non-negative numbers with a positive sum")


def _check_grams(stats: Mapping[str, Tensor], global_sd: Mapping[str, Tensor], kind: str) -> None:
    """RegMean: the input Gram (in × in) of a weight of the model, finite."""
    for k, g in stats.items():
        if k not in global_sd:
            raise BadReply(f"its {kind} statistics name {k!r}, not a tensor of the model")
        n_in = global_sd[k].shape[-1]  # RegMean: the input Gram of a weight (out, in)
        if tuple(g.shape) != (n_in, n_in):
            raise BadReply(f"its {kind} Gram for {k!r} has shape {tuple(g.shape)}, "
                           f"expected ({n_in}, {n_in})")  # fmt: skip
        if not bool(torch.isfinite(g).all()):
            raise BadReply(f"its {kind} statistics for {k!r} are not finite")


def read_reply(
    msg: Message,
    global_sd: Mapping[str, Tensor],
    *,
    array_key: str = "arrays",
    stats_kind: str | None = None,
) -> ClientUpdate:
    """The checked :class:`ClientUpdate` of one train reply (tensors cast to the global
    model's dtypes), or :class:`BadReply` saying why it is left out."""
    if msg.has_error():
        raise BadReply(f"the client failed: {msg.error.reason.strip() or f'code {msg.error.code}'}")
    sd = _arrays(msg, array_key, "model")
    check_tensors(sd, global_sd, "its model")
    metrics: dict[str, float] = {}
    for record in msg.content.metric_records.values():
        metrics.update({k: v for k, v in record.items() if isinstance(v, int | float)})
    n = metrics.get(WEIGHT_KEY)
    if n is None or isinstance(n, bool) or not math.isfinite(n) or n <= 0:
        raise BadReply(f"its MetricRecord has no positive {WEIGHT_KEY!r} (got {n!r})")
    stats = None
    if stats_kind is not None:
        stats = _arrays(msg, STATS_PREFIX + stats_kind, f"{stats_kind} statistics")
        if stats_kind == CLASS_COUNTS:
            _check_class_counts(stats)
        else:
            _check_grams(stats, global_sd, stats_kind)
    sd = {k: t.to(global_sd[k].dtype).clone() for k, t in sd.items()}
    pid = partition_id(msg)
    name = f"client{pid}" if pid is not None else f"node{msg.metadata.src_node_id}"
    return ClientUpdate(name=name, node_id=msg.metadata.src_node_id, state_dict=sd,
                        num_examples=float(n), metrics=metrics, stats=stats)  # fmt: skip
