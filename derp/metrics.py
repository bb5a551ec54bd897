"""The relay's counters and their Prometheus text exposition (sans-IO).

``Metrics`` holds the counters the hot path bumps; ``Gauges`` is a snapshot of what the server can only count
at scrape time (clients, queues, mesh peers). ``render(metrics, gauges)`` is the ``/metrics`` body::

    derp_clients, derp_clients_home, derp_unique_keys, derp_accepts_total,
    derp_packets_forwarded_total, derp_bytes_forwarded_total, derp_packets_received_total, derp_bytes_received_total,
    derp_packets_dropped_total{reason=DropReason}, derp_closes_total{reason=CloseReason},
    derp_queue_bytes, derp_queue_bytes_max, derp_mesh_peers, derp_mesh_forwarded_keys,
    derp_stun_requests_total, derp_stun_bad_total (only with a STUN server)

Every reason is listed from the start (at 0), so a dashboard sees a series before its first event.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

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


def render(m: Metrics, g: Gauges) -> str:
    lines = [
        "# HELP derp_clients Connected, admitted clients (mesh peers included).",
        "# TYPE derp_clients gauge",
        f"derp_clients {g.clients}",
        "# HELP derp_clients_home Clients that said this relay is their home.",
        "# TYPE derp_clients_home gauge",
        f"derp_clients_home {g.clients_home}",
        "# HELP derp_unique_keys Distinct node keys connected.",
        "# TYPE derp_unique_keys gauge",
        f"derp_unique_keys {g.unique_keys}",
        "# TYPE derp_accepts_total counter",
        f"derp_accepts_total {m.accepts}",
        "# HELP derp_packets_forwarded_total Packets written to a receiving client.",
        "# TYPE derp_packets_forwarded_total counter",
        f"derp_packets_forwarded_total {m.packets_forwarded}",
        "# TYPE derp_bytes_forwarded_total counter",
        f"derp_bytes_forwarded_total {m.bytes_forwarded}",
        "# TYPE derp_packets_received_total counter",
        f"derp_packets_received_total {m.packets_received}",
        "# TYPE derp_bytes_received_total counter",
        f"derp_bytes_received_total {m.bytes_received}",
        "# HELP derp_packets_dropped_total Packets dropped, by reason.",
        "# TYPE derp_packets_dropped_total counter",
    ]
    lines += [f'derp_packets_dropped_total{{reason="{r}"}} {n}' for r, n in sorted(m.drops.items())]
    lines += ["# HELP derp_closes_total Connections closed, by reason.", "# TYPE derp_closes_total counter"]
    lines += [f'derp_closes_total{{reason="{r}"}} {n}' for r, n in sorted(m.closes.items())]
    lines += [
        "# HELP derp_queue_bytes Bytes waiting in per-client queues.",
        "# TYPE derp_queue_bytes gauge",
        f"derp_queue_bytes {g.queue_bytes}",
        "# TYPE derp_queue_bytes_max gauge",
        f"derp_queue_bytes_max {g.queue_bytes_max}",
        "# HELP derp_mesh_peers Meshed relays this relay is connected to.",
        "# TYPE derp_mesh_peers gauge",
        f"derp_mesh_peers {g.mesh_peers}",
        "# TYPE derp_mesh_forwarded_keys gauge",
        f"derp_mesh_forwarded_keys {g.mesh_forwarded_keys}",
    ]
    if g.stun is not None:
        lines += [
            "# TYPE derp_stun_requests_total counter",
            f"derp_stun_requests_total {g.stun.requests}",
            "# TYPE derp_stun_bad_total counter",
            f"derp_stun_bad_total {g.stun.bad}",
        ]
    return "\n".join(lines) + "\n"
