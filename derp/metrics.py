"""The relay's counters and their Prometheus exposition through ``prometheus_client`` (sans-IO).

``Metrics`` holds the counters the hot path bumps (plain ints: a frame costs an attribute add, not a library
call); ``Gauges`` is a snapshot of what the server can only count at scrape time (clients, queues, mesh peers).
``families(metrics, gauges)`` turns both into ``prometheus_client`` metric families; ``RelayCollector`` yields them
at each scrape, registered in a ``CollectorRegistry`` its owner builds (no default registry, no module global), and
``render(metrics, gauges)`` is the text exposition of one snapshot. The series::

    derp_clients, derp_clients_home, derp_unique_keys, derp_accepts_total,
    derp_packets_forwarded_total, derp_bytes_forwarded_total, derp_packets_received_total, derp_bytes_received_total,
    derp_packets_dropped_total{reason=DropReason}, derp_closes_total{reason=CloseReason},
    derp_queue_bytes, derp_queue_bytes_max, derp_mesh_peers, derp_mesh_forwarded_keys,
    derp_stun_requests_total, derp_stun_bad_total (only with a STUN server)

Every reason is listed from the start (at 0), so a dashboard sees a series before its first event.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from derp.errors import CloseReason


class DropReason(StrEnum):
    """Why packets were dropped: the ``reason`` label of ``derp_packets_dropped_total``."""

    QUEUE_FULL = "queue_full"
    DISCO_QUEUE_FULL = "disco_queue_full"
    UNKNOWN_DEST = "unknown_dest"
    GONE = "gone"
    MESH_DOWN = "mesh_down"
    WRITE_ERROR = "write_error"


@dataclass
class Metrics:
    accepts: int = 0
    packets_forwarded: int = 0
    bytes_forwarded: int = 0
    packets_received: int = 0
    bytes_received: int = 0
    drops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DropReason, 0))
    closes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CloseReason, 0))

    def drop(self, reason: DropReason, packets: int = 1) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + packets

    def close(self, reason: CloseReason) -> None:
        self.closes[reason] = self.closes.get(reason, 0) + 1


@dataclass(frozen=True, slots=True)
class StunCounts:
    requests: int
    bad: int


@dataclass(frozen=True, slots=True)
class Gauges:
    """What the relay holds at scrape time."""

    clients: int
    clients_home: int
    unique_keys: int
    queue_bytes: int
    queue_bytes_max: int
    mesh_peers: int
    mesh_forwarded_keys: int
    stun: StunCounts | None = None


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def families(m: Metrics, g: Gauges) -> list[Metric]:
    """The relay's metric families for one snapshot. Labels take only enum values (drop and close reasons)."""
    drops = CounterMetricFamily("derp_packets_dropped", "Packets dropped, by reason.", labels=["reason"])
    for r, n in sorted(m.drops.items()):
        drops.add_metric([str(r)], n)
    closes = CounterMetricFamily("derp_closes", "Connections closed, by reason.", labels=["reason"])
    for c, n in sorted(m.closes.items()):
        closes.add_metric([str(c)], n)
    out: list[Metric] = [
        _gauge("derp_clients", "Connected, admitted clients (mesh peers included).", g.clients),
        _gauge("derp_clients_home", "Clients that said this relay is their home.", g.clients_home),
        _gauge("derp_unique_keys", "Distinct node keys connected.", g.unique_keys),
        _counter("derp_accepts", "Connections accepted.", m.accepts),
        _counter("derp_packets_forwarded", "Packets written to a receiving client.", m.packets_forwarded),
        _counter("derp_bytes_forwarded", "Payload bytes written to receiving clients.", m.bytes_forwarded),
        _counter("derp_packets_received", "Packets received from clients.", m.packets_received),
        _counter("derp_bytes_received", "Bytes received from clients.", m.bytes_received),
        drops,
        closes,
        _gauge("derp_queue_bytes", "Bytes waiting in per-client queues.", g.queue_bytes),
        _gauge("derp_queue_bytes_max", "Bytes waiting in the fullest per-client queue.", g.queue_bytes_max),
        _gauge("derp_mesh_peers", "Meshed relays this relay is connected to.", g.mesh_peers),
        _gauge("derp_mesh_forwarded_keys", "Keys reachable through meshed relays.", g.mesh_forwarded_keys),
    ]
    if g.stun is not None:
        out += [
            _counter("derp_stun_requests", "STUN binding requests answered.", g.stun.requests),
            _counter("derp_stun_bad", "STUN datagrams that were not a binding request.", g.stun.bad),
        ]
    return out


class RelayCollector(Collector):
    """Reads the relay's counters and gauges at scrape time: ``snapshot()`` returns (metrics, gauges)."""

    def __init__(self, snapshot: Callable[[], tuple[Metrics, Gauges]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        return families(*self.snapshot())


def render(m: Metrics, g: Gauges) -> str:
    """The Prometheus text exposition of one snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RelayCollector(lambda: (m, g)))
    return generate_latest(registry).decode()
