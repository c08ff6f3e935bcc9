"""The server side of a Flower deployment: an executor whose clients are the sites, reached through a Flower grid.

Everything else the server does is the trainer's own code (participants, failure policy, update checks,
aggregation, server optimizer, callbacks' ``on_aggregate``, evaluation, best model, checkpoints, outputs); only
where a client trains or evaluates differs: a ``train`` or ``evaluate`` message to the node that holds it
(:mod:`harmofl.flower.wire` lists what each message carries). Sites are the nodes' ``site`` names, sorted; the
server holds no data.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from harmofl import validation
from harmofl.data.base import FederatedDataModule, Split
from harmofl.federation.executor import Outcome, Results
from harmofl.federation.failures import ClientFailure
from harmofl.federation.runner import ClientUpdate
from harmofl.flower import wire

if TYPE_CHECKING:
    from harmofl.trainer import FederatedTrainer


class FlowerExecutor:
    """Clients that train and evaluate at their sites, through ``grid``.

    Args:
        grid: the Flower grid of the ServerApp.
        num_sites: the SuperNodes to wait for, ``connect_timeout`` seconds at most.
        reply_timeout: seconds a site may take to answer a round's message (None: no limit); a site that does not
            answer in time has failed that round.
    """

    client_noun = "site"

    def __init__(self, grid: Grid, num_sites: int, connect_timeout: float, reply_timeout: float | None) -> None:
        if grid is None:
            raise RuntimeError("FlowerExecutor needs a Flower grid: the ServerApp passes its own (harmofl.flower.app).")
        if num_sites < 1:
            raise ValueError(f"num-sites must be >= 1 (the SuperNodes to wait for), got {num_sites}.")
        self.grid, self.num_sites = grid, num_sites
        self.connect_timeout, self.reply_timeout = connect_timeout, reply_timeout

    def check_resumable(self) -> None:
        raise ValueError(
            "A Flower run cannot continue from a checkpoint: the sites' own state (local weights, optimizer "
            "state, amplitude targets) lives in their SuperNodes for one run only. Start a new run; evaluate the "
            "checkpoints with `cli.py test --ckpt_path FILE`."
        )

    def connect(self, trainer: FederatedTrainer, datamodule: FederatedDataModule | None, stage: str) -> dict[str, int]:
        """The connected sites and their training samples, asked with a query; refuses what a deployment cannot run."""
        if trainer.pool_clients:
            raise ValueError("trainer.pool_clients pools every site's data in one place: a deployment never does.")
        unsupported = [type(cb).__name__ for cb in trainer.federated_callbacks if not cb.deployable]
        if unsupported:
            raise ValueError(
                f"Callbacks {unsupported} keep per-client state that the Flower protocol does not carry yet; run "
                "them in simulation (`cli.py fit`)."
            )
        self.site_nodes, train_samples = self._discover_sites()
        return {site: train_samples[site] for site in sorted(self.site_nodes)}

    def start(self, trainer: FederatedTrainer) -> None:
        self.trainer = trainer

    def record_holders(self) -> list[str]:
        """None: every site keeps its own record."""
        return []

    def train(
        self, round_idx: int, participants: list[str], shared: Mapping[str, Tensor]
    ) -> Iterator[tuple[str, Outcome]]:
        """Every participant trains at its site, all at once; failed sites are asked again under the failure policy
        (from the same weights and seed)."""
        trainer = self.trainer
        requested = [cb.state_key for cb in trainer.federated_callbacks if cb.shares_client_states()]
        broadcast = self._broadcast(shared)
        outcomes: dict[str, Outcome] = {}
        pending, attempt = list(participants), 0
        while pending:
            instructions = {
                client: wire.train_instruction(
                    broadcast, round_idx, trainer.federation.client_seed(round_idx, client), requested
                )
                for client in pending
            }
            replies = self._exchange_with_sites(instructions, MessageType.TRAIN, group=f"round-{round_idx + 1}")
            for client in pending:
                outcomes[client] = self._read_update(client, replies.get(client), shared, requested)
            failed = {c: o.error for c in pending if isinstance(o := outcomes[c], ClientFailure)}
            policy = trainer.failure_policy
            pending = [c for c, error in failed.items() if policy.retry(c, round_idx, attempt, error, self.client_noun)]
            attempt += 1
        for client in participants:
            yield client, outcomes[client]

    def _read_update(
        self, client: str, reply: Message | None, shared: Mapping[str, Tensor], requested: list[str]
    ) -> Outcome:
        """The site's checked update, its callbacks' state loaded into the server's callbacks; or why it failed."""
        content = self._content_or_error(reply, f"site {client!r}")
        if isinstance(content, str):
            return ClientFailure(content)
        try:
            update = self.trainer.guard.check(wire.read_weights(content), shared)
        except validation.InvalidUpdate as error:
            return ClientFailure(f"InvalidUpdate: {error}")
        states = wire.read_blob(content, wire.CLIENT_STATE) if requested else {}
        missing = [key for key in requested if key not in states]
        if missing:
            return ClientFailure(f"the reply lacks the requested callback states {missing}")
        self.trainer.store.load_callback_states(client, {key: states[key] for key in requested})  # what was asked
        metrics = content.metric_records[wire.METRICS]
        return ClientUpdate(update, float(metrics["loss"]), int(metrics["num-steps"]))  # type: ignore[arg-type]

    def evaluate(self, splits: tuple[Split, ...]) -> Results:
        """Every site evaluates the global model (with its local weights) on ``splits``."""
        round_number = self.trainer.current_round + 1
        instruction = wire.evaluate_instruction(self._broadcast(self.trainer.shared_global_state()), splits)
        sites = self.trainer.federation.client_names
        replies = self._exchange_with_sites(
            dict.fromkeys(sites, instruction), MessageType.EVALUATE, group=f"evaluate-{round_number}"
        )
        results = {}
        for client in sites:
            content = self._content_or_error(replies.get(client), f"site {client!r}")
            if isinstance(content, str):
                raise RuntimeError(
                    f"Site {client!r} failed to evaluate round {round_number}: {content}. The checkpoint "
                    "of the previous round is intact."
                )
            results[client] = wire.read_evaluation(content)
        return results

    # -- messages ------------------------------------------------------------------------------------------------

    def _discover_sites(self) -> tuple[dict[str, int], dict[str, int]]:
        """``{site: node id}`` and ``{site: training samples}`` of the connected nodes, asked with a query."""
        deadline = time.monotonic() + self.connect_timeout
        while len(node_ids := sorted(self.grid.get_node_ids())) < self.num_sites:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(node_ids)} of num-sites={self.num_sites} SuperNodes connected within {self.connect_timeout} "
                    "s: start one `flower-supernode` per site (docs/deployment.md), or lower num-sites."
                )
            time.sleep(0.5)
        replies = self._exchange({node: RecordDict() for node in node_ids}, MessageType.QUERY, group="setup")
        site_nodes: dict[str, int] = {}
        train_samples: dict[str, int] = {}
        for node in node_ids:
            content = self._content_or_error(replies.get(node), f"node {node}")
            if isinstance(content, str):
                raise RuntimeError(f"SuperNode {node} could not describe its site: {content}")
            site = str(content.config_records[wire.SITE][wire.SITE])
            if site in site_nodes:
                raise ValueError(
                    f"SuperNodes {site_nodes[site]} and {node} both serve site {site!r}: give each node its own "
                    "`site` in its --node-config."
                )
            site_nodes[site] = node
            train_samples[site] = int(content.config_records[wire.SITE][wire.TRAIN_SAMPLES])  # type: ignore[arg-type]
        rank_zero_info(f"Sites: {', '.join(f'{s} (node {n})' for s, n in sorted(site_nodes.items()))}.")
        return site_nodes, train_samples

    def _broadcast(self, shared: Mapping[str, Tensor]) -> dict[str, Any]:
        """``shared`` and the federated callbacks' global state (the shared amplitude target), encoded once."""
        states = {cb.state_key: cb.state_dict() for cb in self.trainer.federated_callbacks}
        return wire.broadcast_records(shared, states)

    def _exchange_with_sites(
        self, contents: Mapping[str, RecordDict], message_type: str, group: str
    ) -> dict[str, Message]:
        by_node = self._exchange(
            {self.site_nodes[client]: content for client, content in contents.items()}, message_type, group
        )
        return {client: by_node[node] for client, node in self.site_nodes.items() if node in by_node}

    def _exchange(self, contents: Mapping[int, RecordDict], message_type: str, group: str) -> dict[int, Message]:
        """Send each node its content; the replies that arrive within the reply timeout, by node."""
        messages = [
            Message(content=content, dst_node_id=node, message_type=message_type, group_id=group)
            for node, content in contents.items()
        ]
        replies = self.grid.send_and_receive(messages, timeout=self.reply_timeout)
        return {reply.metadata.src_node_id: reply for reply in replies}

    def _content_or_error(self, reply: Message | None, sender: str) -> RecordDict | str:
        if reply is None:
            return f"no reply from {sender} within {self.reply_timeout} s"
        if reply.has_error():
            return f"{sender} raised {reply.error.reason}"
        return reply.content
