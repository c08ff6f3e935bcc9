"""The server side of a Flower deployment: an executor whose clients are the sites, reached through a Flower grid.

Everything else the server does is the trainer's own code (participants, failure policy, update checks,
aggregation, server optimizer, callbacks' ``on_aggregate``, evaluation, best model, checkpoints, outputs); only
where a client trains or evaluates differs: a ``train`` or ``evaluate`` message to the node that holds it
(:mod:`harmofl.flower.wire` lists what each message carries). Sites are the nodes' ``site`` names, sorted; the
server holds no data.

One exchange per round: each Flower message costs a fresh ClientApp process at the site (importing PyTorch and
Lightning) and the runtime's polling, whatever the model. So a round's evaluation carries the next round's training
to its participants (a ``train`` message with the splits to evaluate first; the other sites get an ``evaluate``
message in the same exchange), and the replies' updates wait in :class:`PrefetchedTraining` until the trainer asks
for that round. The trainer's order is unchanged: checkpoint, ``on_round_end``, ``on_round_start`` come between, and
the instruction the trainer would send then must be the one sent (its fingerprint), else it is sent again.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flwr.app import MessageType
from flwr.serverapp import Grid
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from harmofl import validation
from harmofl.data.base import FederatedDataModule, Split
from harmofl.federation.executor import Outcome, Results
from harmofl.federation.failures import ClientFailure
from harmofl.federation.runner import ClientUpdate, Metrics, batches_per_epoch, local_step_count
from harmofl.flower import site_store, wire
from harmofl.flower.exchange import Outgoing, Received, SiteExchange
from harmofl.flower.replies import RefusedReply, SiteRoster, read_evaluation_reply, read_train_error, read_train_reply

if TYPE_CHECKING:
    from harmofl.trainer import FederatedTrainer


@dataclass(frozen=True)
class PrefetchedTraining:
    """Round ``round_idx``'s training, sent with the previous round's evaluation: the instruction's
    :func:`~harmofl.flower.wire.fingerprint` and each participant's reply (or why it failed)."""

    round_idx: int
    fingerprint: str
    received: dict[str, Received]


class FlowerExecutor:
    """Clients that train and evaluate at their sites, through ``grid``.

    Args:
        grid: the Flower grid of the ServerApp.
        num_sites: the SuperNodes to wait for, ``connect_timeout`` seconds at most.
        reply_timeout: seconds a site may take to answer a round's message (None: no limit); a site that does not
            answer in time has failed that round.
        roster: the sites the operator expects and their training samples (default: any site, its claim capped).
            Every reply is read through :mod:`harmofl.flower.replies`: a reply it refuses is that site's failure.
        combine_exchanges: send each round's training with the previous round's evaluation (one exchange per
            round, plus the last evaluation); False: a ``train`` then an ``evaluate`` exchange per round. The results
            are the same bitwise.
    """

    client_noun = "site"

    def __init__(
        self,
        grid: Grid,
        num_sites: int,
        connect_timeout: float,
        reply_timeout: float | None,
        roster: SiteRoster | None = None,
        combine_exchanges: bool = True,
    ) -> None:
        if grid is None:
            raise RuntimeError("FlowerExecutor needs a Flower grid: the ServerApp passes its own (harmofl.flower.app).")
        if num_sites < 1:
            raise ValueError(f"num-sites must be >= 1 (the SuperNodes to wait for), got {num_sites}.")
        self.num_sites, self.connect_timeout = num_sites, connect_timeout
        self.roster = roster or SiteRoster()
        self.sites = SiteExchange(grid, reply_timeout, self.roster)
        self.combine_exchanges = combine_exchanges
        self.prefetched: PrefetchedTraining | None = None
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
        train_samples = self.sites.discover(self.num_sites, self.connect_timeout)
        epochs, steps = trainer.local_epochs, trainer.local_steps
        #: Each site's local steps per round, from the configuration: the only count the server accepts.
        self.expected_steps = {
            site: local_step_count(batches_per_epoch(samples, datamodule.batch_size), epochs, steps)
            for site, samples in train_samples.items()
        }
        return {site: train_samples[site] for site in sorted(train_samples)}

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
        requested = self._requested_states()
        received = self._take_prefetched(round_idx, participants, shared, requested)
        outcomes: dict[str, Outcome] = {}
        pending, attempt = list(participants), 0
        while pending:
            if received is None:
                broadcast = self._broadcast(shared)
                outgoing = {client: self._train_message(broadcast, round_idx, client, requested) for client in pending}
                received = self.sites.send(outgoing)
            for client in pending:
                outcomes[client] = self._read_update(client, received[client], shared, requested)
            received = None  # a retry is a plain train message
            failed = {c: o.error for c in pending if isinstance(o := outcomes[c], ClientFailure)}
            policy = self.trainer.failure_policy
            pending = [c for c, error in failed.items() if policy.retry(c, round_idx, attempt, error, self.client_noun)]
            attempt += 1
        for client in participants:
            yield client, outcomes[client]

    def _read_update(
        self, client: str, content: Received, shared: Mapping[str, Tensor], requested: list[str]
    ) -> Outcome:
        """The site's checked update, its callbacks' state loaded into the server's callbacks; or why it failed."""
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
        """Every site evaluates the global model (with its local weights) on ``splits``; the next round's
        participants train in the same message (:attr:`combine_exchanges`), their updates kept for :meth:`train`.
        A site whose combined message failed as a whole is asked to evaluate alone (its training has failed)."""
        trainer, round_idx = self.trainer, self.trainer.current_round
        shared = trainer.shared_global_state()
        broadcast = self._broadcast(shared)
        evaluate_alone = Outgoing(
            wire.evaluate_instruction(broadcast, splits, round_idx, self.federation_id),
            MessageType.EVALUATE,
            f"evaluate-{round_idx + 1}",
        )
        trainees, requested = self._next_trainees(), self._requested_states()
        outgoing = {
            site: self._train_message(broadcast, round_idx + 1, site, requested, splits)
            if site in trainees
            else evaluate_alone
            for site in trainer.federation.client_names
        }
        received = self.sites.send(outgoing)
        trained: dict[str, Received] = {site: received[site] for site in trainees}
        retried = self.sites.send({site: evaluate_alone for site in trainees if isinstance(trained[site], str)})
        received.update(retried)
        results = {
            site: self._read_evaluation(site, received[site], splits, site in trainees and site not in retried)
            for site in outgoing
        }
        if trainees:
            trained = {site: self._training_part(site, content) for site, content in trained.items()}
            fingerprint = self._instruction_fingerprint(round_idx + 1, trainees, shared, requested)
            self.prefetched = PrefetchedTraining(round_idx + 1, fingerprint, trained)
        return results

    def _read_evaluation(
        self, site: str, content: Received, splits: tuple[Split, ...], combined: bool
    ) -> dict[str, Metrics]:
        """A site's checked metrics; a site that cannot evaluate stops the run (best.ckpt is chosen on every site's
        metrics)."""
        metrics = self.trainer.module.stage_metrics  # the server's own model names the metrics a site may report
        expected: dict[str, list[str]] = {
            split: [str(name) for name in metrics(split).keys(keep_base=False)] for split in splits
        }
        if isinstance(content, str):
            problem = content
        else:
            try:
                record = wire.EVALUATION if combined else wire.METRICS
                return read_evaluation_reply(content, expected, record, self.trainer.module.unbounded_metrics)
            except RefusedReply as error:
                problem = f"the server refuses its reply: {error}"
        raise RuntimeError(
            f"Site {site!r} failed to evaluate round {self.trainer.current_round + 1}: {problem}. The checkpoint of "
            "the previous round is intact."
        )

    # -- the next round's training, sent with this round's evaluation ---------------------------------------------

    def _next_trainees(self) -> list[str]:
        """The participants of the round after the current one, if its training goes with this evaluation: not after
        the last round, nor when a callback changes its state after evaluations (``changes_state_between_rounds``)."""
        trainer, next_round = self.trainer, self.trainer.current_round + 1
        changing = any(cb.changes_state_between_rounds for cb in trainer.federated_callbacks)
        if not self.combine_exchanges or next_round >= trainer.rounds or changing:
            return []
        return trainer.federation.participants(next_round)

    def _training_part(self, site: str, content: Received) -> Received:
        """The training half of a combined reply: the reply itself (read by :meth:`train`), or why it failed."""
        if isinstance(content, str):
            return content
        try:
            reason = read_train_error(content)
        except RefusedReply as error:
            return f"the server refuses the reply of site {site!r}: {error}"
        return content if reason is None else f"site {site!r} raised {reason}"

    def _take_prefetched(
        self, round_idx: int, participants: list[str], shared: Mapping[str, Tensor], requested: list[str]
    ) -> dict[str, Received] | None:
        """The replies of round ``round_idx``'s training sent with the last evaluation, if that was this very
        instruction; None otherwise (it is sent now)."""
        prefetched, self.prefetched = self.prefetched, None
        if prefetched is None or prefetched.round_idx != round_idx:
            return None
        if prefetched.fingerprint != self._instruction_fingerprint(round_idx, participants, shared, requested):
            rank_zero_warn(
                f"Round {round_idx + 1}'s training instruction changed after it was sent with round {round_idx}'s "
                "evaluation (a callback changed the global weights or its state in on_round_end, on_save_checkpoint "
                "or on_round_start): it is sent again. Declare `changes_state_between_rounds = True` on that callback."
            )
            return None
        return prefetched.received

    def _instruction_fingerprint(
        self, round_idx: int, participants: list[str], shared: Mapping[str, Tensor], requested: list[str]
    ) -> str:
        states = {cb.state_key: cb.state_dict() for cb in self.trainer.federated_callbacks}
        return wire.fingerprint([round_idx, participants, dict(shared), states, requested, self.federation_id])

    def _requested_states(self) -> list[str]:
        return [cb.state_key for cb in self.trainer.federated_callbacks if cb.shares_client_states()]

    def _train_message(
        self,
        broadcast: Mapping[str, Any],
        round_idx: int,
        client: str,
        requested: list[str],
        splits: tuple[Split, ...] = (),
    ) -> Outgoing:
        seed = self.trainer.federation.client_seed(round_idx, client)
        content = wire.train_instruction(broadcast, round_idx, seed, requested, self.federation_id, splits)
        return Outgoing(content, MessageType.TRAIN, f"round-{round_idx + 1}")

    def _broadcast(self, shared: Mapping[str, Tensor]) -> dict[str, Any]:
        """``shared`` and the federated callbacks' global state (the shared amplitude target), encoded once."""
        states = {cb.state_key: cb.state_dict() for cb in self.trainer.federated_callbacks}
        return wire.broadcast_records(shared, states)
