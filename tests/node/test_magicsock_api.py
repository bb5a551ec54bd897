"""The local API and CLI rendering of `shoal ping` and `shoal netcheck`: precise errors for bad requests and for
an agent that is not running; the netcheck report as the CLI prints it."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from node.agent import Agent, AgentConfig
from node.api import create_app
from node.cli import build_parser, render_netcheck


@pytest.mark.anyio
async def test_ping_and_netcheck_requests(tmp_path: Path) -> None:
    agent = Agent(AgentConfig(state_dir=tmp_path / "state"))  # never started nor `up`: no MagicSock
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(agent)), base_url="http://t") as c:
        for body, want in (
            ({}, "peer: expected"),
            ({"peer": ""}, "peer: expected"),
            ({"peer": "x", "timeout": 0}, "timeout: expected 0-60"),
            ({"peer": "x", "timeout": True}, "timeout: expected 0-60"),
            ({"peer": "x", "timeout": 61}, "timeout: expected 0-60"),
            ({"peer": "x", "count": 3}, "unknown field 'count'"),
        ):
            r = await c.post("/ping", json=body)
            assert r.status_code == 400 and want in r.json()["error"], (body, r.text)
        r = await c.post("/ping", content=b"[1]")
        assert r.status_code == 400 and "JSON object" in r.json()["error"]
        r = await c.post("/ping", json={"peer": "n2"})
        assert r.status_code == 409 and "shoal up" in r.json()["error"]
        r = await c.post("/netcheck", json={})
        assert r.status_code == 409 and "no DERP map" in r.json()["error"]


def test_cli_parses_ping_and_netcheck() -> None:
    a = build_parser().parse_args(["ping", "-c", "3", "--no-until-direct", "n2"])
    assert (a.cmd, a.count, a.until_direct, a.peer, a.timeout) == ("ping", 3, False, "n2", 5.0)
    assert build_parser().parse_args(["ping", "n2"]).until_direct is True
    assert build_parser().parse_args(["netcheck", "--json"]).json is True


def test_render_netcheck() -> None:
    text = render_netcheck({
        "UDP": True, "GlobalV4": "203.0.113.11:11131", "GlobalV6": None, "MappingVariesByDestIP": True,
        "PreferredDERP": 900, "HomeDERP": 900, "RegionLatency": {"900": 0.002, "901": 0.0022},
        "RegionEndpoints": {"900": "203.0.113.11:11131", "901": "203.0.113.11:42374"},
        "RegionCodes": {"900": "shoal", "901": "lab2"},
    })
    assert text.splitlines() == [
        "Report:",
        "\t* UDP: true",
        "\t* IPv4: yes, 203.0.113.11:11131",
        "\t* IPv6: no",
        "\t* MappingVariesByDestIP: true",
        "\t* Nearest DERP: shoal (900)",
        "\t* DERP latency:",
        "\t\t- 900 shoal: 2.0ms  203.0.113.11:11131",
        "\t\t- 901 lab2: 2.2ms  203.0.113.11:42374",
    ]
    blocked = render_netcheck({"UDP": False, "MappingVariesByDestIP": None, "HomeDERP": 900,
                               "RegionCodes": {"900": "shoal"}})
    assert "UDP: false" in blocked and "MappingVariesByDestIP: unknown" in blocked
    assert "Nearest DERP: shoal (900)" in blocked and "- 900 shoal: -" in blocked
