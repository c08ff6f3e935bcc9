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
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from harmofl import validation
from harmofl.data.base import FederatedDataModule, Split
from harmofl.federation.executor import Outcome, Results
from harmofl.federation.failures import ClientFailure
from harmofl.federation.runner import ClientUpdate, batches_per_epoch, local_step_count
from harmofl.flower import site_store, wire
from harmofl.flower.replies import RefusedReply, SiteRoster, read_description, read_evaluation_reply, read_train_reply

if TYPE_CHECKING:
    from harmofl.trainer import FederatedTrainer


class FlowerExecutor:
    """Clients that train and evaluate at their sites, through ``grid``.

    Args:
        grid: the Flower grid of the ServerApp.
        num_sites: the SuperNodes to wait for, ``connect_timeout`` seconds at most.
        reply_timeout: seconds a site may take to answer a round's message (None: no limit); a site that does not
            answer in time has failed that round.
        roster: the sites the operator expects and their training samples (default: any site, its claim capped).
            Every reply is read through :mod:`harmofl.flower.replies`: a reply it refuses is that site's failure.
    """

    client_noun = "site"

    def __init__(
        self,
        grid: Grid,
        num_sites: int,
        connect_timeout: float,
        reply_timeout: float | None,
        roster: SiteRoster | None = None,
    ) -> None:
        if grid is None:
            raise RuntimeError("FlowerExecutor needs a Flower grid: the ServerApp passes its own (harmofl.flower.app).")
        if num_sites < 1:
            raise ValueError(f"num-sites must be >= 1 (the SuperNodes to wait for), got {num_sites}.")
        self.grid, self.num_sites = grid, num_sites
        self.connect_timeout, self.reply_timeout = connect_timeout, reply_timeout
        self.roster = roster or SiteRoster()
        #: Names the federation in every train and evaluate message: each site keeps its state under it, on its
        #: own disk. New here; a resumed run takes its checkpoint's (:meth:`load_state_dict`).
        self.federation_id = site_store.new_federation_id()

    def check_resumable(self) -> None:
        """A deployment continues from its checkpoint: the checkpoint holds the federation id, and each site
        continues from the state it saved on its own disk under that id (:mod:`harmofl.flower.site_store`)."""

    def state_dict(self) -> dict[str, Any]:
        return {"federation_id": self.federation_id}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the checkpoint's federation: its id, which the sites' saved states are kept under."""
        if "federation_id" not in state:
            raise ValueError(
                "This checkpoint has no federation id: it was not written by a Flower run (or by an older version), "
                "so the sites' saved states cannot be found. Start a new run (empty ckpt-path)."
            )
        self.federation_id = site_store.check_federation_id(state["federation_id"])

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
        if datamodule is None:
            raise ValueError(
                "FlowerExecutor needs the configuration's data module (it sets up no data: its batch size gives each "
                "site's local steps): trainer.fit(model, datamodule, executor=...)."
            )
        self._warn_of_trusted_claims(trainer)
        self.site_nodes, train_samples = self._discover_sites()
        epochs, steps = trainer.local_epochs, trainer.local_steps
        #: Each site's local steps per round, from the configuration: the only count the server accepts.
        self.expected_steps = {
            site: local_step_count(batches_per_epoch(samples, datamodule.batch_size), epochs, steps)
            for site, samples in train_samples.items()
        }
        return {site: train_samples[site] for site in sorted(self.site_nodes)}

    def _warn_of_trusted_claims(self, trainer: FederatedTrainer) -> None:
        """Warn of what the run config leaves to the sites' word (their names; their data sizes, where they count)."""
        optimizer = trainer.server_optimizer
        steps_weigh = trainer.local_steps is None and optimizer.aggregation_factor(1) != optimizer.aggregation_factor(2)
        for warning in self.roster.trusted_claims(trainer.client_weighting == "samples" or steps_weigh):
            rank_zero_warn(warning)

    def start(self, trainer: FederatedTrainer) -> None:
        self.trainer = trainer

    def record_holders(self) -> list[str]:
        """Every site: the server's record of a site is what the site reported (its callbacks' states, such as its
        amplitude target); the site keeps its local weights and optimizer state itself."""
        return list(self.trainer.federation.client_names)

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
                    broadcast,
                    round_idx,
                    trainer.federation.client_seed(round_idx, client),
                    requested,
                    self.federation_id,
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
            received = read_train_reply(content, requested, self.expected_steps[client])
            update = self.trainer.guard.check(received.state, shared)
            # The callbacks check what they receive (an amplitude target's window): a refusal is this site's failure.
            self.trainer.store.load_callback_states(client, received.client_states)
        except RefusedReply as error:
            return ClientFailure(f"the server refuses the reply of site {client!r}: {error}")
        except validation.InvalidUpdate as error:
            return ClientFailure(f"InvalidUpdate: {error}")
        return ClientUpdate(update, received.loss, self.expected_steps[client])

    def evaluate(self, splits: tuple[Split, ...]) -> Results:
        """Every site evaluates the global model (with its local weights) on ``splits``."""
        round_number = self.trainer.current_round + 1
        instruction = wire.evaluate_instruction(
            self._broadcast(self.trainer.shared_global_state()), splits, self.trainer.current_round, self.federation_id
        )
        sites = self.trainer.federation.client_names
        replies = self._exchange_with_sites(
            dict.fromkeys(sites, instruction), MessageType.EVALUATE, group=f"evaluate-{round_number}"
        )
        metrics = self.trainer.module.stage_metrics  # the server's own model names the metrics a site may report
        expected: dict[str, list[str]] = {
            split: [str(name) for name in metrics(split).keys(keep_base=False)] for split in splits
        }
        results = {}
        for client in sites:  # a site that cannot evaluate stops the run: best.ckpt is chosen on every site's metrics
            content = self._content_or_error(replies.get(client), f"site {client!r}")
            if isinstance(content, str):
                problem = content
            else:
                try:
                    results[client] = read_evaluation_reply(content, expected)
                    continue
                except RefusedReply as error:
                    problem = f"the server refuses its reply: {error}"
            raise RuntimeError(
                f"Site {client!r} failed to evaluate round {round_number}: {problem}. The checkpoint of the previous "
                "round is intact."
            )
        return results

    # -- messages ------------------------------------------------------------------------------------------------

    def _discover_sites(self) -> tuple[dict[str, int], dict[str, int]]:
        """``{site: node id}`` and ``{site: training samples}`` of the connected nodes, asked with a query."""
        deadline = time.monotonic() + self.connect_timeout
        while len(node_ids := sorted(self.grid.get_node_ids())) < self.num_sites:
            if time.monotonic() > deadline:
                absent = f": {self.roster.missing(self._describe(node_ids)[0])} did not" if self.roster.sites else ""
                raise TimeoutError(
                    f"{len(node_ids)} of num-sites={self.num_sites} SuperNodes connected within {self.connect_timeout} "
                    f"s{absent}: start one `flower-supernode` per site (docs/deployment.md), or lower num-sites."
                )
            time.sleep(0.5)
        site_nodes, train_samples = self._describe(node_ids)
        rank_zero_info(f"Sites: {', '.join(f'{s} (node {n})' for s, n in sorted(site_nodes.items()))}.")
        return site_nodes, train_samples

    def _describe(self, node_ids: list[int]) -> tuple[dict[str, int], dict[str, int]]:
        """``{site: node id}`` and ``{site: training samples}`` of ``node_ids``, asked with a query and admitted by
        the roster."""
        replies = self._exchange({node: RecordDict() for node in node_ids}, MessageType.QUERY, group="setup")
        site_nodes: dict[str, int] = {}
        train_samples: dict[str, int] = {}
        for node in node_ids:
            content = self._content_or_error(replies.get(node), f"node {node}")
            if isinstance(content, str):
                raise RuntimeError(f"SuperNode {node} could not describe its site: {content}")
            try:
                site, claimed = read_description(content)
                samples = self.roster.admit(site, claimed)
            except RefusedReply as error:
                raise ValueError(f"SuperNode {node} is refused: {error}.") from error
            if site in site_nodes:
                raise ValueError(
                    f"SuperNodes {site_nodes[site]} and {node} both serve site {site!r}: give each node its own "
                    "`site` in its --node-config."
                )
            site_nodes[site], train_samples[site] = node, samples
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
