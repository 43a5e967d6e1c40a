"""An in-process Grid: the ServerApp's messages handed straight to a ClientApp, no Ray.

For debugging (``mergeforge federated CONFIG --in-process``) and fast tests of the strategy
with Flower's real ``Strategy.start`` loop and the real ClientApp. It does what Flower's
simulation runtime does with a message (``flwr.server.superlink.fleet.vce``): run the
ClientApp on it with the node's ``Context`` (``partition-id``, ``num-partitions``), and turn a
raised exception into an error reply (``Error(code=2, reason)``, Flower's
``CLIENT_APP_RAISED_EXCEPTION``). Clients run one after another; there is no timeout.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

CLIENT_APP_RAISED_EXCEPTION = 2


class LocalGrid(Grid):
    """``num_nodes`` virtual SuperNodes (node ids 1..N, partition ids 0..N-1) running
    ``client_app`` in this process."""

    def __init__(self, client_app: ClientApp, num_nodes: int) -> None:
        self.client_app = client_app
        self.contexts = {
            i + 1: Context(run_id=1, node_id=i + 1, state=RecordDict(), run_config={},
                           node_config={"partition-id": i, "num-partitions": num_nodes})
            for i in range(num_nodes)
        }  # fmt: skip
        self._run = Run.create_empty(run_id=1)
        # the identity a Message takes its sender from (process-wide, as a SuperLink sets it)
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
        self._replies: dict[str, Message] = {}
        self._sent = 0

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:  # fmt: skip
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def _call(self, msg: Message) -> Message:
        context = self.contexts[msg.metadata.dst_node_id]
        try:
            return self.client_app(msg, context)
        except Exception as e:
            reason = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
            return Message(Error(CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            self._sent += 1
            mid = f"local-{self._sent}"
            self._replies[mid] = self._call(msg)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(m) for m in message_ids if m in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:  # fmt: skip
        return self.pull_messages(self.push_messages(messages))
