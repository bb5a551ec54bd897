"""WireGuard device configuration, observed state, and the diff between them (sans-IO).

Engines apply a `WgConfig` by reading the device's current `DeviceState`, calling `plan(desired, current)`
and sending only the resulting `DeviceUpdate`: peers to add, update or remove, allowed IPs replaced only where
they differ, endpoints only where they changed. Applying the same config twice yields an empty update, so
`set()` is idempotent and does not disturb live sessions (re-setting a peer's endpoint would, for example,
undo roaming).

Endpoints are canonical text: `1.2.3.4:41641` or `[fd00::1]:41641` (read by coord.wire.Endpoint). Allowed IPs
are canonical CIDR text with host bits cleared, as WireGuard itself stores them.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from coord import wire
from node.errors import LocalError
from node.keys import PrivateKey, PublicKey


class ConfigError(LocalError, ValueError):
    """A WireGuard config value is malformed."""


def canonical_endpoint(text: str) -> str:
    try:
        return str(wire.Endpoint.parse(text))
    except wire.WireError as e:
        raise ConfigError(str(e)) from None


def split_endpoint(endpoint: str) -> tuple[str, int]:
    try:
        return wire.Endpoint.parse(endpoint).addr
    except wire.WireError as e:
        raise ConfigError(str(e)) from None


def canonical_prefix(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise ConfigError(f"allowed IP {text!r} is not a CIDR prefix") from None


def _prefixes(items: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    return tuple(sorted({canonical_prefix(x) for x in items}, key=_prefix_order))


def _prefix_order(text: str) -> tuple[int, int, int]:
    net = ipaddress.ip_network(text)
    return (net.version, int(net.network_address), net.prefixlen)


@dataclass(frozen=True, slots=True)
class WgPeer:
    public_key: PublicKey
    allowed_ips: tuple[str, ...] = ()
    endpoint: str | None = None
    persistent_keepalive: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_ips", _prefixes(self.allowed_ips))
        if self.endpoint is not None:
            object.__setattr__(self, "endpoint", canonical_endpoint(self.endpoint))
        if not 0 <= self.persistent_keepalive < 65536:
            raise ConfigError(f"persistent keepalive {self.persistent_keepalive} out of range")


@dataclass(frozen=True, slots=True)
class WgConfig:
    private_key: PrivateKey
    listen_port: int
    peers: tuple[WgPeer, ...] = ()
    fwmark: int = 0  # SO_MARK of the engine's own UDP socket (the bypass mark with an exit node); 0 = none

    def __post_init__(self) -> None:
        if not 0 <= self.listen_port < 65536:
            raise ConfigError(f"listen port {self.listen_port} out of range")
        if not 0 <= self.fwmark < 2**32:
            raise ConfigError(f"fwmark {self.fwmark:#x} out of range")
        seen: set[bytes] = set()
        for p in self.peers:
            if p.public_key.raw in seen:
                raise ConfigError(f"peer {p.public_key} listed twice")
            seen.add(p.public_key.raw)


@dataclass(frozen=True, slots=True)
class PeerState:
    public_key: PublicKey
    allowed_ips: tuple[str, ...] = ()
    endpoint: str | None = None
    persistent_keepalive: int = 0
    last_handshake: float | None = None  # unix seconds; None = never
    rx_bytes: int = 0
    tx_bytes: int = 0


@dataclass(frozen=True, slots=True)
class DeviceState:
    private_key: PrivateKey | None = None
    listen_port: int = 0
    peers: tuple[PeerState, ...] = ()
    fwmark: int = 0

    @property
    def public_key(self) -> PublicKey | None:
        return None if self.private_key is None else self.private_key.public()

    def peer(self, key: PublicKey) -> PeerState | None:
        return next((p for p in self.peers if p.public_key.raw == key.raw), None)


@dataclass(frozen=True, slots=True)
class PeerUpdate:
    """One peer's changes. `None` fields are left as they are on the device."""

    public_key: PublicKey
    remove: bool = False
    endpoint: str | None = None
    persistent_keepalive: int | None = None
    allowed_ips: tuple[str, ...] | None = None  # replaces the peer's whole list when set


@dataclass(frozen=True, slots=True)
class DeviceUpdate:
    private_key: PrivateKey | None = None
    listen_port: int | None = None
    peers: tuple[PeerUpdate, ...] = field(default=())
    fwmark: int | None = None

    @property
    def empty(self) -> bool:
        return self.private_key is None and self.listen_port is None and self.fwmark is None and not self.peers


def plan(desired: WgConfig, current: DeviceState) -> DeviceUpdate:
    """What must be sent to turn `current` into `desired`, and nothing more."""
    same_key = current.private_key is not None and current.private_key.raw == desired.private_key.raw
    key = None if same_key else desired.private_key
    port = desired.listen_port if desired.listen_port and desired.listen_port != current.listen_port else None
    updates: list[PeerUpdate] = []
    wanted = {p.public_key.raw for p in desired.peers}
    for have in current.peers:
        if have.public_key.raw not in wanted:
            updates.append(PeerUpdate(have.public_key, remove=True))
    for want in desired.peers:
        have_p = current.peer(want.public_key)
        if have_p is None:
            updates.append(
                PeerUpdate(
                    want.public_key,
                    endpoint=want.endpoint,
                    persistent_keepalive=want.persistent_keepalive or None,
                    allowed_ips=want.allowed_ips,
                )
            )
            continue
        endpoint = want.endpoint if want.endpoint is not None and want.endpoint != have_p.endpoint else None
        keepalive = (
            want.persistent_keepalive if want.persistent_keepalive != have_p.persistent_keepalive else None
        )
        ips = want.allowed_ips if want.allowed_ips != _prefixes(have_p.allowed_ips) else None
        if endpoint is not None or keepalive is not None or ips is not None:
            updates.append(PeerUpdate(want.public_key, endpoint=endpoint, persistent_keepalive=keepalive,
                                      allowed_ips=ips))
    fwmark = desired.fwmark if desired.fwmark != current.fwmark else None
    return DeviceUpdate(key, port, tuple(updates), fwmark)
