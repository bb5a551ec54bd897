"""A fake WireGuard engine for unit tests of the agent: it keeps a DeviceState and writes what it is asked to
do into a FakeRunner's transcript, so OS commands and engine calls read as one text in the order they ran."""

from __future__ import annotations

from dataclasses import replace

from node.run import FakeRunner
from node.wg.config import DeviceState, PeerState, WgConfig, plan


class FakeEngine:
    name = "fake"

    def __init__(self, runner: FakeRunner, iface: str = "shoal0") -> None:
        self.runner = runner
        self.iface = iface
        self.state = DeviceState()
        self.fail_set: str | None = None

    def note(self, line: str) -> None:
        self.runner.lines.append(line)

    async def start(self) -> None:
        self.note("engine start")
        self.state = DeviceState()

    async def stop(self) -> None:
        self.note("engine stop")
        self.state = DeviceState()

    async def get(self) -> DeviceState:
        return self.state

    async def set(self, cfg: WgConfig) -> None:
        if self.fail_set is not None:
            raise RuntimeError(self.fail_set)
        up = plan(cfg, self.state)
        peers = {p.public_key.raw: p for p in self.state.peers}
        for u in up.peers:
            k = u.public_key.raw
            if u.remove:
                self.note(f"wg remove {u.public_key.hex[:8]}")
                peers.pop(k, None)
                continue
            have = peers.get(k) or PeerState(u.public_key)
            parts = [f"wg {'update' if k in peers else 'add'} {u.public_key.hex[:8]}"]
            if u.endpoint is not None:
                parts.append(f"endpoint={u.endpoint}")
                have = replace(have, endpoint=u.endpoint)
            if u.persistent_keepalive is not None:
                parts.append(f"keepalive={u.persistent_keepalive}")
                have = replace(have, persistent_keepalive=u.persistent_keepalive)
            if u.allowed_ips is not None:
                parts.append("allowed=" + ",".join(u.allowed_ips))
                have = replace(have, allowed_ips=u.allowed_ips)
            self.note(" ".join(parts))
            peers[k] = have
        self.state = DeviceState(cfg.private_key, cfg.listen_port, tuple(peers.values()))

    def handshake(self, key: bytes, at: float, endpoint: str | None = None) -> None:
        """What wireguard-go does when a peer's initiation arrives: a session, the endpoint it came from."""
        peers = []
        for p in self.state.peers:
            if p.public_key.raw == key:
                p = replace(p, last_handshake=at, endpoint=endpoint or p.endpoint)
            peers.append(p)
        self.state = replace(self.state, peers=tuple(peers))
