"""The server's guarded reader of the sites' replies: every reply is decoded and checked here before any of it is
used. Whatever is wrong with one (a missing record or key, a blob that does not decode, a value of the wrong type,
a value the configuration rules out) is a :class:`RefusedReply` naming the problem, which the executor makes that
site's failure (``trainer.client_failure`` and its retries apply) or, at connect, an error that stops the run.

What the server accepts (:mod:`harmofl.flower.wire` lists the records):
    ``query``: a site the operator expects (run config ``site-names``; empty: any) and its training-sample count: the
    operator's own (``site-samples``), or without it the site's claim, at most ``max-site-samples``;
    ``train``: weights of tensors (the trainer's update guard checks them further), the callback states the server
    asked for, a finite loss >= 0 and exactly the local steps the configuration gives the site
    (:func:`~harmofl.federation.runner.local_step_count`);
    ``evaluate``: exactly the requested splits, each with exactly the server model's metrics (``loss`` allowed
    too), finite, every metric but ``loss`` in [0, 1] (accuracy, AUROC, Dice are fractions; ``loss`` is >= 0);
    a combined ``train`` reply: its ``evaluation`` checked as an ``evaluate`` reply, then either its training part
    as a ``train`` reply or its ``train-error`` (:func:`read_train_error`).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import RecordDict
from torch import Tensor

from harmofl.flower import wire

#: The largest training-sample count a site may claim when the operator gives none (``max-site-samples``).
DEFAULT_MAX_SITE_SAMPLES = 10_000_000
#: Metrics that are not fractions in [0, 1]: only >= 0.
UNBOUNDED_METRICS = frozenset({"loss"})
#: The longest training-error text of a site the server keeps (a site writes the class and a correlation id).
MAX_REASON_CHARS = 300


class RefusedReply(ValueError):
    """A site's reply that the server does not use, and why."""


@dataclass(frozen=True)
class SiteRoster:
    """The operator's word on the sites (the run config), against which every site's description is checked.

    Args:
        sites: the expected sites, exactly those (``site-names``); empty: any site that connects.
        samples: each site's training samples (``site-samples``); None: the sites' own claims, capped.
        max_samples: the largest claim accepted without ``samples`` (``max-site-samples``).
    """

    sites: tuple[str, ...] = ()
    samples: Mapping[str, int] | None = None
    max_samples: int = DEFAULT_MAX_SITE_SAMPLES

    def __post_init__(self) -> None:
        if len(set(self.sites)) != len(self.sites):
            raise ValueError(f"Run config `site-names` names a site twice: {list(self.sites)}.")
        if self.max_samples < 1:
            raise ValueError(f"Run config `max-site-samples` must be >= 1, got {self.max_samples}.")
        if self.samples is not None and self.sites and set(self.samples) != set(self.sites):
            raise ValueError(
                f"Run config `site-samples` must give the count of exactly the `site-names` {sorted(self.sites)}, got "
                f"{sorted(self.samples)}."
            )

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> SiteRoster:
        """The roster of the run config's ``site-names``, ``site-samples`` and ``max-site-samples``."""
        counts = str(run_config.get("site-samples", "")).strip()
        return cls(
            sites=tuple(parse_names(str(run_config.get("site-names", "")))),
            samples=parse_counts(counts) if counts else None,
            max_samples=int(run_config.get("max-site-samples", DEFAULT_MAX_SITE_SAMPLES)),
        )

    def admit(self, site: str, claimed: int) -> int:
        """The training samples the server counts for ``site``, which claimed ``claimed``; refuses a site the
        operator does not expect, or a claim that differs from the operator's count or exceeds the cap."""
        if self.sites and site not in self.sites:
            raise RefusedReply(
                f"it serves site {site!r}, which is not among the run config's `site-names` {list(self.sites)}: "
                "stop that SuperNode, or add the site to `site-names`"
            )
        if self.samples is not None:
            if site not in self.samples:
                raise RefusedReply(f"site {site!r} has no count in the run config's `site-samples`: add it")
            if claimed != self.samples[site]:
                raise RefusedReply(
                    f"site {site!r} claims {claimed} training samples, the run config's `site-samples` gives "
                    f"{self.samples[site]}: correct one of them"
                )
            return self.samples[site]
        if claimed > self.max_samples:
            raise RefusedReply(
                f"site {site!r} claims {claimed} training samples, more than `max-site-samples`={self.max_samples}: "
                "give each site's count in `site-samples`, or raise the cap"
            )
        return claimed

    def trusted_claims(self, counts_matter: bool) -> list[str]:
        """Warnings of what the run config leaves to the sites' word: who they are, and how much data they hold
        when ``counts_matter`` (weights by training samples, or local epochs under FedNova's step normalization)."""
        warnings = []
        if not self.sites:
            warnings.append("Run config `site-names` is empty: any SuperNode that connects becomes a site. Name them.")
        if self.samples is None and counts_matter:
            warnings.append(
                "Run config `site-samples` is empty: the aggregation weights trust each site's own count of its "
                f"training samples (at most `max-site-samples`={self.max_samples}). Give each site's count."
            )
        return warnings

    def missing(self, present: Collection[str]) -> list[str]:
        """The expected sites not in ``present``."""
        return [site for site in self.sites if site not in present]


def parse_names(text: str) -> list[str]:
    """The names of a comma-separated run-config value (``site-names``), blanks ignored."""
    return [name.strip() for name in text.split(",") if name.strip()]


def parse_counts(text: str) -> dict[str, int]:
    """``{"site_0": 48, "site_1": 32}`` of ``"site_0=48,site_1=32"`` (``site-samples``)."""
    counts: dict[str, int] = {}
    for item in parse_names(text):
        name, _, count = item.partition("=")
        if not name.strip() or not count.strip().isdigit() or name.strip() in counts:
            raise ValueError(f"Run config `site-samples` takes site=count items (each site once), got {item!r}.")
        counts[name.strip()] = int(count)
    return counts


@contextmanager
def decoding(what: str) -> Iterator[None]:
    """Any error while decoding ``what`` is a :class:`RefusedReply`: a site chooses the bytes it sends, so any
    decoder error (KeyError, ``pickle.UnpicklingError``, torch.load's RuntimeError, TypeError...) is its fault."""
    try:
        yield
    except RefusedReply:
        raise
    except Exception as error:
        # The first sentence only: torch.load's advice to retry without weights_only is not for a server.
        cause = (str(error).split(". ")[0].splitlines() or [""])[0][:120]
        raise RefusedReply(f"its {what} cannot be read ({type(error).__name__}: {cause})") from error


def require_records(
    content: RecordDict, arrays: Sequence[str] = (), configs: Sequence[str] = (), metrics: Sequence[str] = ()
) -> None:
    """Refuse a reply that lacks one of the named records."""
    present: list[set[str]] = [set(content.array_records), set(content.config_records), set(content.metric_records)]
    missing = [name for names, kind in zip((arrays, configs, metrics), present) for name in names if name not in kind]
    if missing:
        raise RefusedReply(f"it lacks the record {missing[0]!r}")


def read_description(content: RecordDict) -> tuple[str, int]:
    """A ``query`` reply's site name and claimed training samples."""
    require_records(content, configs=[wire.SITE])
    description = content.config_records[wire.SITE]
    site, samples = description.get(wire.SITE), description.get(wire.TRAIN_SAMPLES)
    if not isinstance(site, str) or not site:
        raise RefusedReply(f"its site name is {site!r}, not a non-empty name")
    if not is_count(samples):
        raise RefusedReply(f"its training-sample count is {samples!r}, not an int >= 0")
    return site, int(samples)  # type: ignore[arg-type]  # is_count checked it


@dataclass
class TrainReply:
    """A checked ``train`` reply: the update's weights, the mean training loss, the requested callback states."""

    state: dict[str, Tensor]
    loss: float
    client_states: dict[str, Any]


def read_train_reply(content: RecordDict, requested: Sequence[str], expected_steps: int) -> TrainReply:
    """A ``train`` reply, checked: its weights are tensors, it holds the ``requested`` callback states, its loss is
    finite and >= 0, and it reports ``expected_steps`` local steps."""
    require_records(content, [wire.ARRAYS], [wire.BUFFERS, *([wire.CLIENT_STATE] if requested else [])], [wire.METRICS])
    with decoding("weights"):
        state = wire.read_weights(content)
    not_dense = [key for key, value in state.items() if not is_dense_cpu_tensor(value)]
    if not_dense:
        raise RefusedReply(f"its weights {not_dense[:5]} are not dense CPU tensors")
    metrics = dict(content.metric_records[wire.METRICS])
    if set(metrics) != {"loss", "num-steps"}:
        raise RefusedReply(f"its training metrics are {sorted(metrics)}, not ['loss', 'num-steps']")
    loss, steps = metrics["loss"], metrics["num-steps"]
    check_metric("loss", loss)
    if not is_count(steps) or steps != expected_steps:
        raise RefusedReply(f"it reported {steps!r} local steps, the configuration gives {expected_steps}")
    return TrainReply(state, float(loss), read_client_states(content, requested))  # type: ignore[arg-type]


def read_client_states(content: RecordDict, requested: Sequence[str]) -> dict[str, Any]:
    """The ``requested`` callback states of a ``train`` reply (nothing else it may hold), each a dict."""
    if not requested:
        return {}
    with decoding("callback states"):
        states = wire.read_blob(content, wire.CLIENT_STATE)
    if not isinstance(states, dict):
        raise RefusedReply(f"its callback states are a {type(states).__name__}, not a dict")
    missing = [key for key in requested if not isinstance(states.get(key), dict)]
    if missing:
        raise RefusedReply(f"it lacks the requested callback states {missing}")
    return {key: states[key] for key in requested}


def read_evaluation_reply(
    content: RecordDict,
    expected: Mapping[str, Collection[str]],
    record: str = wire.METRICS,
    unbounded: Collection[str] = (),
) -> dict[str, dict[str, float]]:
    """An ``evaluate`` reply's ``{split: {metric: value}}`` (``record``: a combined train reply's ``evaluation``),
    checked: exactly the ``expected`` splits, each with exactly its expected metric names (``loss`` allowed too),
    every value in range (:func:`check_metric`): in [0, 1] but for ``loss`` and the model's ``unbounded`` metrics
    (distances such as ``hd95``), which must be >= 0."""
    require_records(content, metrics=[record])
    with decoding("metrics"):
        results = wire.read_evaluation(content, record)
    if set(results) != set(expected):
        raise RefusedReply(f"it evaluated the splits {sorted(results)}, the server asked for {sorted(expected)}")
    for split, names in expected.items():
        unknown = sorted(set(results[split]) - set(names) - UNBOUNDED_METRICS)
        missing = sorted(set(names) - set(results[split]))
        if unknown or missing:
            raise RefusedReply(
                f"its {split} metrics {sorted(results[split])} are not the model's {sorted(names)} (unknown "
                f"{unknown}, missing {missing})"
            )
        for name, value in results[split].items():
            check_metric(f"{split}/{name}", value, bounded=name not in UNBOUNDED_METRICS and name not in unbounded)
    return results


def read_train_error(content: RecordDict) -> str | None:
    """Why a combined ``train`` reply's training failed at the site (its ``train-error``), or None: it trained."""
    if wire.TRAIN_ERROR not in content.config_records:
        return None
    reason = content.config_records[wire.TRAIN_ERROR].get("reason")
    if not isinstance(reason, str):
        raise RefusedReply(f"its training error is {reason!r}, not a text")
    return reason[:MAX_REASON_CHARS]


def check_metric(name: str, value: Any, bounded: bool = False) -> None:
    """Refuse a metric value that is not a finite number >= 0, or (``bounded``) not in [0, 1]."""
    in_range = is_number(value) and math.isfinite(value) and value >= 0 and (value <= 1 or not bounded)
    if not in_range:
        expected = "a finite number in [0, 1]" if bounded else "a finite number >= 0"
        raise RefusedReply(f"its {name} is {value!r}, not {expected}")


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_dense_cpu_tensor(value: Any) -> bool:
    """What the aggregators can average: an ordinary tensor (not sparse, quantized or on the meta device)."""
    return (
        isinstance(value, Tensor)
        and value.layout == torch.strided
        and value.device.type == "cpu"
        and not value.is_quantized
    )


def is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
