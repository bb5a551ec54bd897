"""`shoal status` without I/O: what each peer's path is, by what was observed, and the status document.

Path rule (`path()`), from one snapshot of the engine and of the path state:
- `direct`: the engine's endpoint is the direct address our path discovery confirmed (for a peer without
  disco, the endpoint we gave it) *and* a handshake completed within WireGuard's session lifetime (180 s);
- `derp`: the engine's endpoint is the peer's DERP socket, with such a handshake (CLI `relay DERP(900)`);
- `unconfirmed`: a handshake, but the engine holds an address our path discovery has not confirmed (it
  roamed there, or the confirmation lapsed and the engine has not been set back yet);
- `connecting`: the peer is in the engine, no handshake has completed yet;
- `stale`: the last handshake is older than the session lifetime (CLI `no handshake for 212s`);
- `none`: the peer is not in the engine (not running, or kept out because its filter is not in place).
"""

from __future__ import annotations

from dataclasses import dataclass

SESSION_LIFETIME = 180.0  # WireGuard's REJECT_AFTER_TIME: no session outlives it without a new handshake


@dataclass(frozen=True)
class Observed:
    """One peer as the engine and the path state saw it in the same snapshot."""

    in_engine: bool
    endpoint: str | None  # what the engine holds
    last_handshake: float | None  # unix seconds
    derp: bool  # `endpoint` is this peer's DERP socket
    confirmed: str | None  # the direct address path discovery confirmed ("" for a peer without disco)


def path(o: Observed, now: float) -> str:
    if not o.in_engine:
        return "none"
    if not o.last_handshake:
        return "connecting"
    if now - o.last_handshake > SESSION_LIFETIME:
        return "stale"
    if o.derp:
        return "derp"
    if o.endpoint and (o.confirmed == "" or o.endpoint == o.confirmed):
        return "direct"
    return "unconfirmed"


def path_text(p: str, endpoint: str | None, derp_region: int | None, last_handshake: float | None,
              now: float) -> str:
    """The CLI's words for a path (`shoal status`, `shoal ping`)."""
    if p == "direct":
        return f"direct {endpoint}"
    if p == "derp":
        return f"relay DERP({derp_region})"
    if p == "unconfirmed":
        return f"unconfirmed {endpoint}"
    if p == "connecting":
        return "connecting"
    if p == "stale" and last_handshake:
        return f"no handshake for {max(0.0, now - last_handshake):.0f}s"
    return "no path"
