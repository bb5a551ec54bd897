"""The kernel WireGuard engine, over generic netlink (pyroute2).

The engine works in the namespace the agent runs in. It talks to two pyroute2-shaped objects, injected so
tests can record the calls: `ipr` (IPRoute: `link_lookup`, `link`) and `wg` (WireGuard: `info`, `set`).
pyroute2 is synchronous, so calls run in a worker thread. Kernel `set` takes one peer per message; allowed IPs
are replaced with WGPEER_F_REPLACE_ALLOWEDIPS so a shrinking list shrinks on the device too.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any, Protocol

from node.keys import PrivateKey, PublicKey
from node.wg.config import (
    DeviceState,
    PeerState,
    WgConfig,
    canonical_endpoint,
    canonical_prefix,
    plan,
    split_endpoint,
)


class IPRouteLike(Protocol):
    def link_lookup(self, **kw: Any) -> list[int]: ...
    def link(self, command: str, **kw: Any) -> Any: ...


class WireGuardLike(Protocol):
    def info(self, interface: str) -> Any: ...
    def set(self, interface: str, listen_port: int | None = None, fwmark: int | None = None,
            private_key: str | None = None, peer: dict[str, Any] | None = None) -> Any: ...


class KernelEngine:
    name = "kernel"

    def __init__(self, iface: str, ipr: IPRouteLike | None = None, wg: WireGuardLike | None = None) -> None:
        if ipr is None or wg is None:
            from pyroute2 import IPRoute, WireGuard

            ipr = ipr if ipr is not None else IPRoute()
            wg = wg if wg is not None else WireGuard()
        self.iface = iface
        self.ipr: IPRouteLike = ipr
        self.wg: WireGuardLike = wg
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        if not await asyncio.to_thread(self.ipr.link_lookup, ifname=self.iface):
            await asyncio.to_thread(self.ipr.link, "add", ifname=self.iface, kind="wireguard")

    async def stop(self) -> None:
        idx = await asyncio.to_thread(self.ipr.link_lookup, ifname=self.iface)
        if idx:
            await asyncio.to_thread(self.ipr.link, "del", index=idx[0])

    async def get(self) -> DeviceState:
        msgs = await asyncio.to_thread(self.wg.info, self.iface)
        return device_from_netlink(list(msgs))

    async def set(self, cfg: WgConfig) -> None:
        async with self._lock:
            update = plan(cfg, await self.get())
            if update.private_key is not None or update.listen_port is not None or update.fwmark is not None:
                await asyncio.to_thread(
                    self.wg.set, self.iface,
                    private_key=None if update.private_key is None else update.private_key.b64,
                    listen_port=update.listen_port, fwmark=update.fwmark,
                )
            for p in update.peers:
                peer: dict[str, Any] = {"public_key": p.public_key.b64}
                if p.remove:
                    peer["remove"] = True
                else:
                    if p.endpoint is not None:
                        peer["endpoint_addr"], peer["endpoint_port"] = split_endpoint(p.endpoint)
                    if p.persistent_keepalive is not None:
                        peer["persistent_keepalive"] = p.persistent_keepalive
                    if p.allowed_ips is not None:
                        peer["replace_allowed_ips"] = True
                        peer["allowed_ips"] = list(p.allowed_ips)
                await asyncio.to_thread(self.wg.set, self.iface, peer=peer)


def device_from_netlink(msgs: list[Any]) -> DeviceState:
    """DeviceState from WG_CMD_GET_DEVICE replies (large devices span several messages)."""
    private_key: PrivateKey | None = None
    port = 0
    fwmark = 0
    peers: dict[bytes, PeerState] = {}
    for msg in msgs:
        key = msg.get_attr("WGDEVICE_A_PRIVATE_KEY")
        if key is not None:
            raw = base64.b64decode(key)
            if raw != bytes(32):
                private_key = PrivateKey(raw)
        port = msg.get_attr("WGDEVICE_A_LISTEN_PORT") or port
        fwmark = msg.get_attr("WGDEVICE_A_FWMARK") or fwmark
        for p in msg.get_attr("WGDEVICE_A_PEERS") or []:
            pub = PublicKey.from_b64(_text(p.get_attr("WGPEER_A_PUBLIC_KEY")))
            ep = p.get_attr("WGPEER_A_ENDPOINT")
            endpoint = None
            if ep and ep.get("port"):
                host = ep["addr"]
                text = f"[{host}]:{ep['port']}" if ":" in host else f"{host}:{ep['port']}"
                endpoint = canonical_endpoint(text)
            hs = p.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
            last = None
            if hs and (hs.get("tv_sec") or hs.get("tv_nsec")):
                last = hs["tv_sec"] + hs["tv_nsec"] / 1e9
            ips = tuple(canonical_prefix(a["addr"]) for a in p.get_attr("WGPEER_A_ALLOWEDIPS") or [])
            old = peers.get(pub.raw)
            # a peer with many allowed IPs continues in the next message under the same key
            if old is not None:
                ips = old.allowed_ips + ips
            peers[pub.raw] = PeerState(
                public_key=pub,
                allowed_ips=ips,
                endpoint=endpoint if endpoint is not None else (old.endpoint if old else None),
                persistent_keepalive=p.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0,
                last_handshake=last,
                rx_bytes=p.get_attr("WGPEER_A_RX_BYTES") or 0,
                tx_bytes=p.get_attr("WGPEER_A_TX_BYTES") or 0,
            )
    return DeviceState(private_key, port, tuple(peers.values()), fwmark)


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v
