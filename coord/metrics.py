"""The server's Prometheus metrics, through ``prometheus_client``, in one registry the composition root builds.

``ServerMetrics(registry)`` creates the instruments the write path and the fan-out update, and registers a
collector that reads the rest at scrape time from the running parts (``bind``):

    shoal_events_appended_total             events committed to the log
    shoal_append_seconds                    histogram: one group-commit transaction, store append to commit
    shoal_nodes{state="online"|"offline"}   nodes in the tailnet by connection state (the fold's view)
    shoal_map_sessions                      open long-poll map streams
    shoal_fanout_seconds                    histogram: a change's first submit to its sessions woken (batch delay
                                            included)
    shoal_fanout_sessions_woken_total       map sessions woken by the fan-out
    shoal_requests_refused_total{reason}    requests refused by the limits (coord/limits.py ``Refusals`` reasons)
    shoal_webhook_deliveries_total{outcome} webhook POSTs by outcome: delivered, failed (retried later) or
                                            undeliverable (given up after the retry window; the endpoint moves on)
    shoal_webhook_events_delivered_total    events in the batches delivered

No label takes unbounded values: no key, address or node name is ever a label. There is no module-level
registry and ``prometheus_client``'s default ``REGISTRY`` is never used, so two servers in one process (tests)
keep apart. Per-endpoint detail stays out of the labels: `webhooks list` and `webhooks deliveries` show it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# Seconds; an append is one SQLite transaction (fsync with durability=full), fan-out includes the batch delay.
APPEND_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
FANOUT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
WEBHOOK_OUTCOMES = ("delivered", "failed", "undeliverable")
REFUSAL_REASONS = ("rate", "pending_source", "pending_total", "replay_source", "replay_total", "bad_request")


@dataclass(frozen=True)
class Readings:
    """What the collector reads at scrape time."""

    nodes_online: int
    nodes_offline: int
    map_sessions: int
    refused: Mapping[str, int]


class _Live(Collector):
    def __init__(self) -> None:
        self.read: Callable[[], Readings] | None = None

    def collect(self) -> Iterable[Metric]:
        if self.read is None:
            return []
        r = self.read()
        nodes = GaugeMetricFamily("shoal_nodes", "Nodes in the tailnet, by connection state.", labels=["state"])
        nodes.add_metric(["online"], r.nodes_online)
        nodes.add_metric(["offline"], r.nodes_offline)
        refused = CounterMetricFamily("shoal_requests_refused", "Requests refused by the server's limits, by reason.",
                                      labels=["reason"])
        for reason in sorted({*REFUSAL_REASONS, *r.refused}):
            refused.add_metric([reason], r.refused.get(reason, 0))
        return [nodes, GaugeMetricFamily("shoal_map_sessions", "Open long-poll map streams.", value=r.map_sessions),
                refused]


class ServerMetrics:
    """The server's instruments, registered in ``registry`` (one per server, built by ``create_app``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.events_appended = Counter("shoal_events_appended", "Events committed to the event log.",
                                       registry=registry)
        self.append_seconds = Histogram("shoal_append_seconds", "Time to commit one group-commit transaction.",
                                        buckets=APPEND_BUCKETS, registry=registry)
        self.fanout_seconds = Histogram("shoal_fanout_seconds",
                                        "Time from a change's first submit to its map sessions woken.",
                                        buckets=FANOUT_BUCKETS, registry=registry)
        self.sessions_woken = Counter("shoal_fanout_sessions_woken", "Map sessions woken by the fan-out.",
                                      registry=registry)
        self.webhook_deliveries = Counter("shoal_webhook_deliveries", "Webhook POSTs, by outcome.",
                                          labelnames=["outcome"], registry=registry)
        for outcome in WEBHOOK_OUTCOMES:
            self.webhook_deliveries.labels(outcome)  # every series exists from the start, at 0
        self.webhook_events = Counter("shoal_webhook_events_delivered",
                                      "Events in the webhook batches delivered.", registry=registry)
        self._live = _Live()
        registry.register(self._live)

    def bind(self, read: Callable[[], Readings]) -> None:
        """Where the scrape-time gauges come from (the running server's state, streams and limits)."""
        self._live.read = read

    def appended(self, events: int, seconds: float) -> None:
        self.events_appended.inc(events)
        self.append_seconds.observe(seconds)

    def webhook_attempt(self, outcome: str, events: int) -> None:
        self.webhook_deliveries.labels(outcome).inc()
        if outcome == "delivered":
            self.webhook_events.inc(events)

    def fanned_out(self, sessions: int, seconds: float) -> None:
        self.sessions_woken.inc(sessions)
        self.fanout_seconds.observe(seconds)
