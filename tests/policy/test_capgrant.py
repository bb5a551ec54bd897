"""App grants (coord/policy/capgrant.py) delivered to the destination; `shoal whois` reads them (node/whois.py)."""

from __future__ import annotations

import json

import pytest

from coord import wire
from coord.policy import PolicyEngine, PolicyNode, parse
from node import mapsession
from node.whois import WhoisError, whois

POLICY = """{
  "tagOwners": {"tag:files": ["alice@example.com"]},
  "groups": {"group:docs": ["alice@example.com", "bob@example.com"]},
  "grants": [
    {"src": ["group:docs"], "dst": ["tag:files"], "ip": ["tcp:443"],
     "app": {"example.com/cap/files": [{"shares": ["docs"], "access": "ro"}]}},
    {"src": ["alice@example.com"], "dst": ["tag:files"],
     "app": {"example.com/cap/files": [{"shares": ["*"], "access": "rw"}], "example.com/cap/admin": [{}]}},
    {"src": ["*"], "dst": ["tag:files"], "ip": ["tcp:80"]}
  ]
}"""
NODES = [
    PolicyNode(1, None, frozenset({"tag:files"}), ("100.64.0.1", "fd7a:115c:a1e0::1")),
    PolicyNode(2, "alice@example.com", frozenset(), ("100.64.0.2", "fd7a:115c:a1e0::2")),
    PolicyNode(3, "bob@example.com", frozenset(), ("100.64.0.3",)),
    PolicyNode(4, "eve@example.com", frozenset(), ("100.64.0.4",)),
]


def test_capgrant_compiled_for_the_destination_only() -> None:
    eng = PolicyEngine(parse(POLICY), NODES)
    assert eng.cap_grants(1) == [
        {"SrcIPs": ["100.64.0.2", "fd7a:115c:a1e0::2", "100.64.0.3"],
         "CapMap": {"example.com/cap/files": [{"shares": ["docs"], "access": "ro"}]}},
        {"SrcIPs": ["100.64.0.2", "fd7a:115c:a1e0::2"],
         "CapMap": {"example.com/cap/admin": [{}], "example.com/cap/files": [{"shares": ["*"], "access": "rw"}]}},
    ]
    assert eng.cap_grants(2) == [] and eng.cap_grants(4) == []
    eng.remove(3)
    assert eng.cap_grants(1)[0]["SrcIPs"] == ["100.64.0.2", "fd7a:115c:a1e0::2"]


def _netmap(grants: list[dict[str, object]]) -> mapsession.NetMap:
    def rec(i: int, name: str, addrs: list[str], tags: list[str]) -> dict[str, object]:
        return {"ID": i, "Name": f"{name}.shoal.internal.", "User": None if tags else i, "Tags": tags,
                "Addresses": addrs, "Key": "nodekey:" + f"{i:02x}" * 32}
    msg = {"Node": rec(1, "files", ["100.64.0.1/32"], ["tag:files"]),
           "Peers": [rec(2, "alice", ["100.64.0.2/32", "fd7a:115c:a1e0::2/128"], []),
                     rec(4, "eve", ["100.64.0.4/32"], [])],
           "CapGrants": grants}
    return mapsession.apply(mapsession.NetMap(), wire.MapResponse.from_json(json.loads(json.dumps(msg))))


def test_capgrant_whois_merges_the_grants_of_an_address() -> None:
    nm = _netmap(PolicyEngine(parse(POLICY), NODES).cap_grants(1))
    w = whois(nm, "fd7a:115c:a1e0::2")
    assert w["Node"]["Name"] == "alice.shoal.internal." and w["Node"]["Tags"] == []
    assert w["CapMap"] == {"example.com/cap/files": [{"shares": ["docs"], "access": "ro"},
                                                     {"shares": ["*"], "access": "rw"}],
                           "example.com/cap/admin": [{}]}
    assert whois(nm, "100.64.0.4")["CapMap"] == {}
    with pytest.raises(WhoisError, match="no node of this tailnet"):
        whois(nm, "100.64.0.99")
    with pytest.raises(WhoisError, match="not an IP address"):
        whois(nm, "alice")


def test_capgrant_wire_refuses_bad_grants() -> None:
    for bad in ([{"SrcIPs": ["x"], "CapMap": {}}], [{"SrcIPs": [], "CapMap": {"c": [1]}}], [{"CapMap": {}}]):
        with pytest.raises(wire.WireError, match="CapGrants"):
            wire.MapResponse.from_json({"CapGrants": bad})
