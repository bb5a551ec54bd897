"""The systemd-resolved path: mode detection, the call plan as text, and the calls as a stand-in
org.freedesktop.resolve1 receives them on a private dbus-daemon (no systemd here: PID 1 is not systemd)."""

from __future__ import annotations

import asyncio
import ipaddress
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from node.dns.resolved import DEST, PATH, LinkConfig, Resolved, mode_of, plan

CFG = LinkConfig.build(7, ["100.100.100.100", "fd7a:115c:a1e0::53"], ["shoal.internal."],
                       ["shoal.internal.", "64.100.in-addr.arpa."], ["corp.example."], capture_all=False)


def test_dns_resolved_mode(tmp_path: Path) -> None:
    stub = tmp_path / "stub-resolv.conf"
    stub.write_text("# This is /run/systemd/resolve/stub-resolv.conf\nnameserver 127.0.0.53\noptions edns0\n")
    assert mode_of(stub) == "systemd-resolved"
    plain = tmp_path / "plain"
    plain.write_text("nameserver 192.0.2.53\n")
    assert mode_of(plain) == "direct" and mode_of(tmp_path / "missing") == "direct"


def show(v: Any) -> Any:
    """Packed addresses as text, so the transcript reads."""
    if isinstance(v, (list, tuple)):
        return [show(x) for x in v]
    return str(ipaddress.ip_address(v)) if isinstance(v, bytes) else v


def test_dns_resolved_plan_text() -> None:
    text = "\n".join(f"{c.member} {c.signature} {show(c.body)!r}" for c in plan(CFG))
    assert text == (
        "SetLinkDNS ia(iay) [7, [[2, '100.100.100.100'], [10, 'fd7a:115c:a1e0::53']]]\n"
        "SetLinkDomains ia(sb) [7, [['shoal.internal', False], ['shoal.internal', True], "
        "['64.100.in-addr.arpa', True], ['corp.example', True]]]\n"
        "SetLinkDefaultRoute ib [7, False]\n"
        "SetLinkLLMNR is [7, 'no']\n"
        "SetLinkMulticastDNS is [7, 'no']\n"
        "SetLinkDNSSEC is [7, 'no']\n"
        "SetLinkDNSOverTLS is [7, 'no']\n"
        "FlushCaches  []"
    )
    every = LinkConfig.build(7, ["100.100.100.100"], [], [], [], capture_all=True)
    assert [c.body for c in plan(every)][1:3] == [[7, [[".", True]]], [7, True]]


async def _stand_in(address: str, calls: list[tuple[str, list[Any]]]) -> Any:
    from dbus_fast import Message, MessageType
    from dbus_fast.aio import MessageBus

    bus = await MessageBus(bus_address=address).connect()

    def handler(msg: Message) -> Message | None:
        if msg.message_type != MessageType.METHOD_CALL or msg.path != PATH:
            return None
        calls.append((msg.member or "", list(msg.body)))
        return Message.new_method_return(msg)

    bus.add_message_handler(handler)
    await bus.request_name(DEST)
    return bus


@pytest.mark.skipif(not shutil.which("dbus-daemon"), reason="needs dbus-daemon")
def test_dns_resolved_against_a_stand_in_on_a_private_bus(tmp_path: Path) -> None:
    sock = tmp_path / "bus"
    daemon = subprocess.Popen(["dbus-daemon", "--session", "--nofork", "--nopidfile",
                               f"--address=unix:path={sock}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(100):
            if sock.exists():
                break
            subprocess.run(["sleep", "0.05"])
        address = f"unix:path={sock}"

        async def go() -> list[tuple[str, list[Any]]]:
            calls: list[tuple[str, list[Any]]] = []
            bus = await _stand_in(address, calls)
            r = Resolved(address)
            assert await r.set(CFG)
            assert not await r.set(CFG)  # idempotent: nothing sent
            await r.revert(7)
            bus.disconnect()
            return calls

        calls = asyncio.run(go())
    finally:
        daemon.terminate()
        daemon.wait(5)
    assert [m for m, _ in calls] == [c.member for c in plan(CFG)] + ["RevertLink"]
    assert show(calls[0][1]) == [7, [[2, "100.100.100.100"], [10, "fd7a:115c:a1e0::53"]]]
    assert show(calls[1][1])[1][-1] == ["corp.example", True]
    assert calls[-1] == ("RevertLink", [7])


@pytest.mark.skipif(not shutil.which("dbus-daemon"), reason="needs dbus-daemon")
def test_dns_resolved_magicdns_chooses_resolved_and_leaves_the_file_alone(tmp_path: Path) -> None:
    from coord import wire
    from node.dns.magic import MagicDNS

    sock = tmp_path / "bus"
    daemon = subprocess.Popen(["dbus-daemon", "--session", "--nofork", "--nopidfile",
                               f"--address=unix:path={sock}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stub = tmp_path / "resolv.conf"
    stub_text = "# This is /run/systemd/resolve/stub-resolv.conf\nnameserver 127.0.0.53\n"
    stub.write_text(stub_text)
    try:
        for _ in range(100):
            if sock.exists():
                break
            subprocess.run(["sleep", "0.05"])
        address = f"unix:path={sock}"

        async def go() -> tuple[list[tuple[str, list[Any]]], str]:
            calls: list[tuple[str, list[Any]]] = []
            bus = await _stand_in(address, calls)
            m = MagicDNS(True, stub, tmp_path / "backup", port=0, addrs=("127.0.0.1",), iface="lo",
                         resolved_bus=address)
            dns = wire.DNSConfig(domains=("shoal.internal",), proxied=True, routes=(("shoal.internal.", ()),
                                 ("corp.example.", ("192.0.2.53",))))
            assert await m.apply(None, [], dns, accept_dns=True) == ""
            mode = m.status(True)["OSConfig"]
            assert await m.apply(None, [], dns, accept_dns=True) == ""  # nothing new: no calls
            assert await m.stop() == []
            bus.disconnect()
            return calls, mode

        calls, mode = asyncio.run(go())
    finally:
        daemon.terminate()
        daemon.wait(5)
    assert mode == "systemd-resolved"
    assert [c for c, _ in calls] == [c.member for c in plan(CFG)] + ["RevertLink"]
    domains = [list(d) for d in calls[1][1][1]]
    assert ["shoal.internal", False] in domains  # search
    assert ["corp.example", True] in domains and ["shoal.internal", True] in domains  # routing-only
    assert calls[2][1] == [1, False]  # no global resolvers: resolved keeps the default route elsewhere
    assert stub.read_text() == stub_text and not (tmp_path / "backup").exists()
