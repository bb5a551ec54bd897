"""nft rendering as text, plus one check-mode load of several rule shapes in a throwaway netns."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess

import pytest

from node.render.nft import RenderError, render

A = ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"]
SSH_ONLY = [
    {
        "SrcIPs": A,
        "DstPorts": [
            {"IP": "100.64.0.2/32", "Ports": {"First": 22, "Last": 22}},
            {"IP": "fd7a:115c:a1e0::2/128", "Ports": {"First": 22, "Last": 22}},
        ],
        "IPProto": [6],
    }
]
SHAPES = [
    *SSH_ONLY,
    {"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]},
    {"SrcIPs": ["100.64.0.0/10"], "DstPorts": [{"IP": "10.1.0.0/16", "Ports": {"First": 1000, "Last": 2000}}]},
    {
        "SrcIPs": ["100.64.0.5-100.64.0.9"],
        "DstPorts": [{"IP": "100.64.0.2/32", "Ports": {"First": 53, "Last": 53}}],
        "IPProto": [17, 132, 47],
    },
    {"SrcIPs": ["fd7a:115c:a1e0::/48"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 0}}], "IPProto": [58]},
]
OWN = ["100.64.0.2", "fd7a:115c:a1e0::2"]


def test_ssh_only_text() -> None:
    text = render(SSH_ONLY, "shoal0", OWN, table="shoal_filter")
    lines = [x.strip() for x in text.splitlines()]
    assert lines[:3] == ["table inet shoal_filter {}", "delete table inet shoal_filter", "table inet shoal_filter {"]
    body = lines[lines.index("chain from_tailnet {") + 1 :]
    assert body == [
        "ct state established,related accept",
        "ip saddr @self4 counter name dropped drop",
        "ip6 saddr @self6 counter name dropped drop",
        "ip saddr 100.64.0.1 ip daddr 100.64.0.2 tcp dport 22 ct state new accept",
        "ip saddr 100.64.0.1 ip daddr 100.64.0.2 icmp type echo-request accept",
        "ip6 saddr fd7a:115c:a1e0::1 ip6 daddr fd7a:115c:a1e0::2 tcp dport 22 ct state new accept",
        "ip6 saddr fd7a:115c:a1e0::1 ip6 daddr fd7a:115c:a1e0::2 icmpv6 type echo-request accept",
        "counter name dropped drop",
        "}",
        "}",
    ]
    assert 'iifname "shoal0" jump from_tailnet' in text


def test_default_protocols_and_any() -> None:
    text = render([SHAPES[1]], "tail0")
    for want in (
        "meta nfproto ipv4 tcp dport 0-65535 ct state new accept",
        "meta nfproto ipv4 udp dport 0-65535 ct state new accept",
        "meta nfproto ipv4 meta l4proto icmp accept",
        "meta nfproto ipv6 meta l4proto icmpv6 accept",
    ):
        assert want in text
    assert "self4" not in text


def test_empty_filter_drops_everything_new() -> None:
    text = render([], "tail0", OWN)
    body = text.split("chain from_tailnet {")[1]
    assert "accept" in body.splitlines()[1] and body.count("accept") == 1  # only established/related


def test_idempotent_and_family_split() -> None:
    assert render(SHAPES, "tail0", OWN) == render(SHAPES, "tail0", OWN)
    # A v4-only source never produces an ip6 rule for a v6 destination.
    text = render([SHAPES[2]], "tail0")
    assert "ip6 " not in text.split("chain from_tailnet")[1]


@pytest.mark.parametrize(
    "rules,iface,table",
    [
        ([{"SrcIPs": ["nope"], "DstPorts": []}], "tail0", "t"),
        ([{"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 5, "Last": 1}}]}], "tail0", "t"),
        ([{"DstPorts": []}], "tail0", "t"),
        ([], 'bad"name', "t"),
        ([], "tail0", "bad table"),
    ],
)
def test_bad_input(rules: list[dict[str, object]], iface: str, table: str) -> None:
    with pytest.raises(RenderError):
        render(rules, iface, table=table)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("ip"), reason="needs root, nft")
def test_nft_accepts_rendered_script(tmp_path: object) -> None:
    ns = f"shoaltest-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for rules in ([], SSH_ONLY, SHAPES):
            script = render(rules, "shoal0", OWN, table="shoal_test")
            r = subprocess.run(
                ["ip", "netns", "exec", ns, "nft", "-c", "-f", "-"], input=script, text=True, capture_output=True
            )
            assert r.returncode == 0, r.stderr + script
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
