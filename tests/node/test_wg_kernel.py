"""Kernel engine against a recorded netlink transcript.

This machine has no WireGuard module, so the netlink objects are fakes that record each call as text. Their
`info()` answers are real pyroute2 `wgmsg` messages, encoded to bytes and decoded again, so the engine parses
exactly what pyroute2 hands it from a kernel.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from pyroute2.netlink.generic.wireguard import AsyncWireGuard, wgmsg

from node.keys import PrivateKey, PublicKey
from node.wg.config import WgConfig, WgPeer
from node.wg.engine import choose_engine
from node.wg.go import GoEngine
from node.wg.kernel import KernelEngine

PRIV = PrivateKey(bytes(range(1, 33)))
A = PublicKey(bytes([0xAA] * 32))
B = PublicKey(bytes([0xBB] * 32))


class Recorder:
    def __init__(self) -> None:
        self.lines: list[str] = []

    @property
    def transcript(self) -> str:
        return "".join(line + "\n" for line in self.lines)


class FakeIPRoute:
    def __init__(self, rec: Recorder) -> None:
        self.rec = rec
        self.links: dict[str, int] = {}

    def link_lookup(self, **kw: Any) -> list[int]:
        self.rec.lines.append(f"ipr.link_lookup({_kw(kw)})")
        idx = self.links.get(kw["ifname"])
        return [] if idx is None else [idx]

    def link(self, command: str, **kw: Any) -> None:
        self.rec.lines.append(f"ipr.link({command!r}, {_kw(kw)})")
        if command == "add":
            self.links[kw["ifname"]] = len(self.links) + 7
        elif command == "del":
            self.links = {k: v for k, v in self.links.items() if v != kw["index"]}


class FakeWireGuard:
    """Holds device state the way the kernel does and answers like it."""

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec
        self.private_key: str | None = None
        self.port = 0
        self.peers: dict[str, dict[str, Any]] = {}

    def info(self, interface: str) -> list[wgmsg]:
        self.rec.lines.append(f"wg.info({interface!r})")
        msg = wgmsg()
        msg["cmd"] = 0
        msg["version"] = 1
        msg["attrs"].append(["WGDEVICE_A_IFNAME", interface])
        if self.private_key:
            msg["attrs"].append(["WGDEVICE_A_PRIVATE_KEY", self.private_key.encode()])
        msg["attrs"].append(["WGDEVICE_A_LISTEN_PORT", self.port])
        # the kernel nests every peer in one WGDEVICE_A_PEERS attribute; borrow pyroute2's peer encoder
        builder = AsyncWireGuard.__new__(AsyncWireGuard)
        scratch = wgmsg()
        for p in self.peers.values():
            builder._wg_set_peer(scratch, p)
        if scratch["attrs"]:
            msg["attrs"].append(["WGDEVICE_A_PEERS", [x for _, peers in scratch["attrs"] for x in peers]])
        msg.encode()
        back = wgmsg(msg.data)
        back.decode()
        return [back]

    def set(self, interface: str, listen_port: int | None = None, fwmark: int | None = None,
            private_key: str | None = None, peer: dict[str, Any] | None = None) -> None:
        args = {"listen_port": listen_port, "private_key": private_key and "<key>", "peer": peer}
        given = {k: v for k, v in args.items() if v is not None}
        self.rec.lines.append(f"wg.set({interface!r}, {_kw(given)})")
        if private_key is not None:
            self.private_key = private_key
        if listen_port is not None:
            self.port = listen_port
        if peer is not None:
            if peer.get("remove"):
                self.peers.pop(peer["public_key"])
                return
            old = self.peers.get(peer["public_key"], {"public_key": peer["public_key"]})
            new = {**old, **{k: v for k, v in peer.items() if k != "replace_allowed_ips"}}
            self.peers[peer["public_key"]] = new


def _kw(kw: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in sorted(kw.items()))


@pytest.fixture
def engine() -> tuple[KernelEngine, Recorder]:
    rec = Recorder()
    return KernelEngine("shoal0", ipr=FakeIPRoute(rec), wg=FakeWireGuard(rec)), rec


@pytest.mark.anyio
async def test_kernel_transcript(engine: tuple[KernelEngine, Recorder]) -> None:
    eng, rec = engine
    await eng.start()
    await eng.start()  # the link exists now: no second add
    cfg = WgConfig(PRIV, 41641, (
        WgPeer(A, ("100.64.0.2/32", "fd7a:115c:a1e0::2/128"), "192.0.2.2:41641", 25),
        WgPeer(B, ("100.64.0.3/32",), "[2001:db8::3]:41641"),
    ))
    await eng.set(cfg)
    await eng.set(cfg)  # idempotent: a read and nothing else
    a, b = A.b64, B.b64
    assert rec.transcript == (
        "ipr.link_lookup(ifname='shoal0')\n"
        "ipr.link('add', ifname='shoal0', kind='wireguard')\n"
        "ipr.link_lookup(ifname='shoal0')\n"
        "wg.info('shoal0')\n"
        "wg.set('shoal0', listen_port=41641, private_key='<key>')\n"
        f"wg.set('shoal0', peer={{'public_key': '{a}', 'endpoint_addr': '192.0.2.2', 'endpoint_port': 41641, "
        "'persistent_keepalive': 25, 'replace_allowed_ips': True, "
        "'allowed_ips': ['100.64.0.2/32', 'fd7a:115c:a1e0::2/128']})\n"
        f"wg.set('shoal0', peer={{'public_key': '{b}', 'endpoint_addr': '2001:db8::3', "
        "'endpoint_port': 41641, 'replace_allowed_ips': True, 'allowed_ips': ['100.64.0.3/32']})\n"
        "wg.info('shoal0')\n"
    )
    state = await eng.get()
    assert state.private_key == PrivateKey(PRIV.raw)
    assert state.listen_port == 41641
    assert {str(p.public_key): (p.allowed_ips, p.endpoint, p.persistent_keepalive) for p in state.peers} == {
        str(A): (("100.64.0.2/32", "fd7a:115c:a1e0::2/128"), "192.0.2.2:41641", 25),
        str(B): (("100.64.0.3/32",), "[2001:db8::3]:41641", 0),
    }

    rec.lines.clear()
    await eng.set(WgConfig(PRIV, 41641, (WgPeer(A, ("100.64.0.2/32",), "192.0.2.2:41641", 25),)))
    await eng.stop()
    assert rec.transcript == (
        "wg.info('shoal0')\n"
        f"wg.set('shoal0', peer={{'public_key': '{b}', 'remove': True}})\n"
        f"wg.set('shoal0', peer={{'public_key': '{a}', 'replace_allowed_ips': True, "
        "'allowed_ips': ['100.64.0.2/32']})\n"
        "ipr.link_lookup(ifname='shoal0')\n"
        "ipr.link('del', index=7)\n"
    )


def test_private_key_b64_matches_wg_tool_form() -> None:
    assert PRIV.b64 == base64.b64encode(bytes(range(1, 33))).decode()


def test_choose_engine_without_module_is_wireguard_go() -> None:
    # no WireGuard module here (and a netns target always means the userspace engine)
    assert isinstance(choose_engine("shoal0", netns="x"), GoEngine)
    assert choose_engine("shoal0", prefer="wireguard-go").name == "wireguard-go"
