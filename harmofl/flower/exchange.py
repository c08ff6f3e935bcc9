"""The server's messages to the sites through a Flower grid: which node serves which site (a ``query`` at connect,
admitted by the operator's roster), and one exchange of messages, each site's reply or why there is none.

An exchange pushes its messages and polls for the replies every :data:`POLL_SECONDS`: ``Grid.send_and_receive``
sleeps 3 s between polls, a fixed cost per exchange that a short poll of the SuperLink avoids.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import NamedTuple

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid
from lightning.pytorch.utilities import rank_zero_info

from harmofl.flower.replies import RefusedReply, SiteRoster, read_description

#: Seconds between two polls of the SuperLink for replies.
POLL_SECONDS = 0.2
#: A site's reply content, or why there is none to use.
Received = RecordDict | str


class Outgoing(NamedTuple):
    """One message to a site: its content, Flower message type and group (the round it belongs to)."""

    content: RecordDict
    message_type: str
    group: str


class SiteExchange:
    """Messages to the sites of ``grid``, whose replies are awaited ``reply_timeout`` seconds at most (None: no
    limit); ``roster`` admits the sites at :meth:`discover`."""

    def __init__(self, grid: Grid, reply_timeout: float | None, roster: SiteRoster) -> None:
        self.grid, self.reply_timeout, self.roster = grid, reply_timeout, roster
        #: ``{site: node id}`` of the admitted sites (:meth:`discover`).
        self.site_nodes: dict[str, int] = {}

    def discover(self, num_sites: int, connect_timeout: float) -> dict[str, int]:
        """Wait for ``num_sites`` nodes (``connect_timeout`` s at most), ask each for its site; ``{site: training
        samples}`` as the roster admits them."""
        deadline = time.monotonic() + connect_timeout
        while len(node_ids := sorted(self.grid.get_node_ids())) < num_sites:
            if time.monotonic() > deadline:
                absent = f": {self.roster.missing(self._describe(node_ids)[0])} did not" if self.roster.sites else ""
                raise TimeoutError(
                    f"{len(node_ids)} of num-sites={num_sites} SuperNodes connected within {connect_timeout} "
                    f"s{absent}: start one `flower-supernode` per site (docs/deployment.md), or lower num-sites."
                )
            time.sleep(0.5)
        self.site_nodes, train_samples = self._describe(node_ids)
        rank_zero_info(f"Sites: {', '.join(f'{s} (node {n})' for s, n in sorted(self.site_nodes.items()))}.")
        return train_samples

    def _describe(self, node_ids: list[int]) -> tuple[dict[str, int], dict[str, int]]:
        """``{site: node id}`` and ``{site: training samples}`` of ``node_ids``, asked with a query and admitted by
        the roster."""
        replies = self._send_to_nodes({node: Outgoing(RecordDict(), MessageType.QUERY, "setup") for node in node_ids})
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

    def send(self, outgoing: Mapping[str, Outgoing]) -> dict[str, Received]:
        """Send each site its message, all at once; each site's reply content, or why there is none."""
        if not outgoing:
            return {}
        by_node = self._send_to_nodes({self.site_nodes[site]: message for site, message in outgoing.items()})
        return {site: self._content_or_error(by_node.get(self.site_nodes[site]), f"site {site!r}") for site in outgoing}

    def _send_to_nodes(self, outgoing: Mapping[int, Outgoing]) -> dict[int, Message]:
        """Push each node its message; the replies that arrive within the reply timeout, by node."""
        messages = [
            Message(content=content, dst_node_id=node, message_type=message_type, group_id=group)
            for node, (content, message_type, group) in outgoing.items()
        ]
        pending = set(self.grid.push_messages(messages))
        deadline = None if self.reply_timeout is None else time.monotonic() + self.reply_timeout
        replies: dict[int, Message] = {}
        while pending:
            for reply in self.grid.pull_messages(pending):
                replies[reply.metadata.src_node_id] = reply
                pending.discard(reply.metadata.reply_to_message_id)
            if not pending or (deadline is not None and time.monotonic() > deadline):
                break
            time.sleep(POLL_SECONDS)
        return replies

    def _content_or_error(self, reply: Message | None, sender: str) -> Received:
        if reply is None:
            return f"no reply from {sender} within {self.reply_timeout} s"
        if reply.has_error():
            return f"{sender} raised {reply.error.reason}"
        return reply.content
