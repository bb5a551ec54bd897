"""Inputs of the golden tests; expected outputs live in golden/<name>.json (SHOAL_UPDATE_GOLDEN=1 rewrites)."""

from __future__ import annotations

from typing import Any

N = [
    {"id": 1, "user": "alice@example.com", "addresses": ["100.64.0.1", "fd7a:115c:a1e0::1"]},
    {"id": 2, "user": "alice@example.com", "addresses": ["100.64.0.2", "fd7a:115c:a1e0::2"]},
    {"id": 3, "user": "bob@example.com", "addresses": ["100.64.0.3", "fd7a:115c:a1e0::3"]},
    {"id": 4, "user": None, "tags": ["tag:web"], "addresses": ["100.64.0.4", "fd7a:115c:a1e0::4"]},
    {
        "id": 5,
        "user": None,
        "tags": ["tag:router"],
        "addresses": ["100.64.0.5"],
        "approved_routes": ["10.1.0.0/16"],
        "exit_node": True,
    },
]

CASES: dict[str, dict[str, Any]] = {
    "ssh_only": {
        "policy": '{"tagOwners": {"tag:web": [], "tag:router": []},'
        ' "acls": [{"action": "accept", "src": ["alice@example.com"], "dst": ["bob@example.com:22"], "proto": "tcp"}]}',
        "nodes": N,
    },
    "groups_tags_self": {
        "policy": """{
          // HuJSON: comments and trailing commas
          "groups": {"group:eng": ["alice@example.com", "bob@example.com",],},
          "tagOwners": {"tag:web": ["group:eng"], "tag:router": []},
          "grants": [
            {"src": ["group:eng"], "dst": ["tag:web"], "ip": ["tcp:443", "udp:53", "80,8080-8090"]},
            {"src": ["autogroup:member"], "dst": ["autogroup:self"], "ip": ["*"]},
          ],
        }""",
        "nodes": N,
    },
    "routes_exit_and_roles": {
        "policy": """{
          "tagOwners": {"tag:web": ["autogroup:admin"], "tag:router": ["autogroup:admin"]},
          "hosts": {"lan": "10.1.2.0/24"},
          "acls": [
            {"action": "accept", "src": ["autogroup:admin"], "dst": ["lan:*", "autogroup:internet:*"]},
            {"action": "accept", "src": ["tag:web"], "dst": ["10.1.0.0/16:5432"]},
          ],
        }""",
        "nodes": N,
        "roles": {"bob@example.com": ["admin"]},
    },
    "no_policy_allow_all": {"policy": None, "nodes": N[:3]},
}
