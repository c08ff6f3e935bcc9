"""The server of a Flower deployment: the orchestrator's own round loop, with its clients on Flower SuperNodes."""

from __future__ import annotations

import time
from typing import Any, Iterator, Mapping, Optional, Union

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from harmofl import reporting, validation
from harmofl.clients.base import FederatedClient
from harmofl.data.base import FederatedDataModule, Split
from harmofl.flower import wire
from harmofl.trainer import ClientUpdate, FederatedTrainer


class FlowerServer(FederatedTrainer):
    """:class:`~harmofl.trainer.FederatedTrainer` whose clients run at the sites, reached through a Flower ``Grid``.

    Everything the server does is the trainer's own code: participants per round, the failure policy, update
    checks, weighted (or robust) aggregation, the server optimizer, callbacks' ``on_aggregate`` (HarmoFL: the
    round-1 average of the sites' amplitude targets, then frozen), per-round evaluation by every site, best-model
    selection, ``last.ckpt`` / ``best.ckpt`` / ``metrics.csv`` / ``summary.json`` and the loggers. Only where a
    client trains or evaluates differs: a ``train`` or ``evaluate`` message to the node that holds it
    (:mod:`harmofl.flower.wire` lists what each message carries). Sites are the nodes' ``site`` names, in sorted
    order; the server holds no data.
    """

    def connect(self, grid: Grid, num_sites: int, connect_timeout: float, reply_timeout: Optional[float]) -> None:
        """Use ``grid``: wait up to ``connect_timeout`` s for ``num_sites`` nodes; a site that does not answer a
        round's message within ``reply_timeout`` s (None: no limit) has failed that round."""
        if num_sites < 1:
            raise ValueError(f"num-sites must be >= 1 (the SuperNodes to wait for), got {num_sites}.")
        self.grid, self.num_sites = grid, num_sites
        self.connect_timeout, self.reply_timeout = connect_timeout, reply_timeout

    def fit(  # type: ignore[override]
        self, model: FederatedClient, datamodule: Optional[FederatedDataModule] = None, ckpt_path: Optional[str] = None
    ) -> dict[str, Any]:
        if ckpt_path is not None:
            raise ValueError(
                "A Flower run cannot continue from a checkpoint: the sites' own state (local weights, optimizer "
                "state, amplitude targets) lives in their SuperNodes for one run only. Start a new run; evaluate the "
                "checkpoints with `cli.py test --ckpt_path FILE`."
            )
        return super().fit(model, datamodule)  # type: ignore[arg-type]

    # -- setup: the federation is the connected sites ------------------------------------------------------------

    def _setup(self, model: FederatedClient, datamodule: Optional[FederatedDataModule], stage: str) -> None:
        if not hasattr(self, "grid"):
            raise RuntimeError("FlowerServer needs a Flower grid: call connect(grid, ...) first, as the app does.")
        if self.pool_clients:
            raise ValueError("trainer.pool_clients pools every site's data in one place: a deployment never does.")
        unsupported = [type(cb).__name__ for cb in self._client_state_callbacks()
                       if not hasattr(cb, "shares_client_states")]
        if unsupported:
            raise ValueError(
                f"Callbacks {unsupported} keep per-client state that the Flower protocol does not carry yet; run "
                "them in simulation (`cli.py fit`)."
            )
        self.site_nodes, train_samples = self._discover_sites()
        self._setup_federation(sorted(self.site_nodes), train_samples)
        self.my_clients, self.my_trainees = [], []  # every client trains and evaluates at its site
        self._setup_model(model, stage)

    def _discover_sites(self) -> tuple[dict[str, int], dict[str, int]]:
        """``{site: node id}`` and ``{site: training samples}`` of the connected nodes, asked with a query."""
        deadline = time.monotonic() + self.connect_timeout
        while len(node_ids := sorted(self.grid.get_node_ids())) < self.num_sites:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(node_ids)} of num-sites={self.num_sites} SuperNodes connected within {self.connect_timeout} "
                    "s: start one `flower-supernode` per site (README, 'Deploying across hospitals'), or lower "
                    "num-sites."
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
            train_samples[site] = int(content.config_records[wire.SITE][wire.TRAIN_SAMPLES])
        rank_zero_info(f"Sites: {', '.join(f'{s} (node {n})' for s, n in sorted(site_nodes.items()))}.")
        return site_nodes, train_samples

    # -- where clients train and evaluate: at their sites -----------------------------------------------------

    def _client_updates(
        self, round_idx: int, participants: list[str], shared: Mapping[str, Tensor]
    ) -> Iterator[tuple[str, Union[ClientUpdate, str]]]:
        """Every participant trains at its site, all at once; a failed site is asked again ``client_retries`` times
        (from the same weights and seed), then the failure policy applies."""
        requested = [cb.state_key for cb in self._client_state_callbacks() if cb.shares_client_states()]
        broadcast = self._broadcast(shared)
        outcomes: dict[str, Union[ClientUpdate, str]] = {}
        pending = list(participants)
        for attempt in range(self.client_retries + 1):
            instructions = {
                client: wire.train_instruction(broadcast, round_idx, self.client_seed(round_idx, client), requested)
                for client in pending
            }
            replies = self._exchange_with_sites(instructions, MessageType.TRAIN, group=f"round-{round_idx + 1}")
            for client in pending:
                outcomes[client] = self._read_update(client, replies.get(client), shared, requested)
            pending = [client for client in pending if isinstance(outcomes[client], str)]
            if not pending:
                break
            for client in pending:
                where = f"Site {client!r} failed in round {round_idx + 1} (attempt {attempt + 1})"
                if attempt < self.client_retries:
                    rank_zero_warn(f"{where}: {outcomes[client]}. Retrying.")
                elif self.client_failure == "raise":
                    raise RuntimeError(
                        f"{where}: {outcomes[client]}. Set trainer.client_failure: skip to continue without a "
                        "failing site."
                    )
        for client in participants:
            yield client, outcomes[client]

    def _read_update(
        self, client: str, reply: Optional[Message], shared: Mapping[str, Tensor], requested: list[str]
    ) -> Union[ClientUpdate, str]:
        """The site's checked update, its callbacks' state loaded into the server's callbacks; or why it failed."""
        content = self._content_or_error(reply, f"site {client!r}")
        if isinstance(content, str):
            return content
        try:
            update = self.checked_update(wire.read_weights(content), shared)
        except validation.InvalidUpdate as error:
            return f"InvalidUpdate: {error}"
        states = wire.read_blob(content, wire.CLIENT_STATE) if requested else {}
        missing = [key for key in requested if key not in states]
        if missing:
            return f"the reply lacks the requested callback states {missing}"
        self._load_client_callback_states(client, {key: states[key] for key in requested})  # what was asked, only
        metrics = content.metric_records[wire.METRICS]
        return ClientUpdate(update, float(metrics["loss"]), int(metrics["num-steps"]))

    def _evaluate_clients(self, splits: tuple[Split, ...]) -> dict[str, dict[str, dict[str, float]]]:
        """Every site evaluates the global model (with its local weights) on ``splits``."""
        instruction = wire.evaluate_instruction(self._broadcast(self.shared_global_state()), splits)
        replies = self._exchange_with_sites({client: instruction for client in self.client_names},
                                            MessageType.EVALUATE, group=f"evaluate-{self.current_round + 1}")
        results = {}
        for client in self.client_names:
            content = self._content_or_error(replies.get(client), f"site {client!r}")
            if isinstance(content, str):
                raise RuntimeError(
                    f"Site {client!r} failed to evaluate round {self.current_round + 1}: {content}. The checkpoint "
                    "of the previous round is intact."
                )
            results[client] = wire.read_evaluation(content)
        return results

    def _end_round(self, round_idx: int, results: dict[str, dict[str, dict[str, float]]]) -> None:
        super()._end_round(round_idx, results)
        # The server's log (`flwr log`, `flwr run --stream`) is where a deployment is watched: one line a round.
        metric = self.module.primary_metric
        score = reporting.mean_over_clients(results, self.held_out)["val"][metric]
        rank_zero_info(f"Round {round_idx + 1}/{self.rounds}: mean val {metric} {score:.4f} (best round "
                       f"{self.best_round}); {len(self.failures)} site failures so far.")

    def _broadcast(self, shared: Mapping[str, Tensor]) -> dict[str, Any]:
        """``shared`` and the federated callbacks' global state (the shared amplitude target), encoded once."""
        return wire.broadcast_records(shared, {cb.state_key: cb.state_dict() for cb in self._client_state_callbacks()})

    # -- messages ------------------------------------------------------------------------------------------------

    def _exchange_with_sites(self, contents: Mapping[str, RecordDict], message_type: str, group: str
                             ) -> dict[str, Message]:
        by_node = self._exchange({self.site_nodes[client]: content for client, content in contents.items()},
                                 message_type, group)
        return {client: by_node[node] for client, node in self.site_nodes.items() if node in by_node}

    def _exchange(self, contents: Mapping[int, RecordDict], message_type: str, group: str) -> dict[int, Message]:
        """Send each node its content; the replies that arrive within the reply timeout, by node."""
        messages = [Message(content=content, dst_node_id=node, message_type=message_type, group_id=group)
                    for node, content in contents.items()]
        replies = self.grid.send_and_receive(messages, timeout=self.reply_timeout)
        return {reply.metadata.src_node_id: reply for reply in replies}

    def _content_or_error(self, reply: Optional[Message], sender: str) -> Union[RecordDict, str]:
        if reply is None:
            return f"no reply from {sender} within {self.reply_timeout} s"
        if reply.has_error():
            return f"{sender} raised {reply.error.reason}"
        return reply.content
