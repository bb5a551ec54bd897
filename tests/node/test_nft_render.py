"""nft rendering as text, malformed rules (explicit and fuzzed), and check-mode loads in a throwaway netns."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

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
QUAD100_DROPS = ["ip daddr 100.100.100.100 counter name dropped drop",
                 "ip6 daddr fd7a:115c:a1e0::53 counter name dropped drop"]


def test_ssh_only_text() -> None:
    text = render(SSH_ONLY, "shoal0", OWN, table="shoal_filter")
    lines = [x.strip() for x in text.splitlines()]
    assert lines[:3] == ["table inet shoal_filter {}", "delete table inet shoal_filter", "table inet shoal_filter {"]
    body = lines[lines.index("chain from_tailnet {") + 1 :]
    assert body == [
        *QUAD100_DROPS,
        "ct state established,related accept",
        "ip saddr @self4 counter name dropped drop",
        "ip6 saddr @self6 counter name dropped drop",
        # each accept after its count-only twin: the rule's counter (shoal status --filter)
        "ip saddr 100.64.0.1 ip daddr 100.64.0.2 tcp dport 22 ct state new counter name rule_0",
        "ip saddr 100.64.0.1 ip daddr 100.64.0.2 tcp dport 22 ct state new accept",
        "ip saddr 100.64.0.1 ip daddr 100.64.0.2 icmp type echo-request counter name rule_0",
        "ip saddr 100.64.0.1 ip daddr 100.64.0.2 icmp type echo-request accept",
        "ip6 saddr fd7a:115c:a1e0::1 ip6 daddr fd7a:115c:a1e0::2 tcp dport 22 ct state new counter name rule_0",
        "ip6 saddr fd7a:115c:a1e0::1 ip6 daddr fd7a:115c:a1e0::2 tcp dport 22 ct state new accept",
        "ip6 saddr fd7a:115c:a1e0::1 ip6 daddr fd7a:115c:a1e0::2 icmpv6 type echo-request counter name rule_0",
        "ip6 saddr fd7a:115c:a1e0::1 ip6 daddr fd7a:115c:a1e0::2 icmpv6 type echo-request accept",
        "counter name dropped drop",
        "}",
        "}",
    ]
    assert 'iifname "shoal0" jump from_tailnet' in text
    assert "\tcounter rule_0 {}" in text.splitlines()


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
    assert "accept" in body.splitlines()[3] and body.count("accept") == 1  # only established/related


def test_idempotent_and_family_split() -> None:
    assert render(SHAPES, "tail0", OWN) == render(SHAPES, "tail0", OWN)
    # A v4-only source never produces an ip6 rule for a v6 destination.
    text = render([SHAPES[2]], "tail0")
    assert "ip6 " not in text.split("chain from_tailnet")[1].replace(QUAD100_DROPS[1], "")


@pytest.mark.parametrize(
    "rules,iface,table",
    [
        ([{"SrcIPs": ["nope"], "DstPorts": []}], "tail0", "t"),
        ([{"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 5, "Last": 1}}]}], "tail0", "t"),
        ([{"DstPorts": []}], "tail0", "t"),
        ([], 'bad"name', "t"),
        ([], "tail0", "bad table"),
        ([{"SrcIPs": [None], "DstPorts": []}], "tail0", "t"),
        ([{"SrcIPs": "100.64.0.1", "DstPorts": []}], "tail0", "t"),
        ([{"SrcIPs": ["*"], "DstPorts": ["100.64.0.2:22"]}], "tail0", "t"),
        ([{"SrcIPs": ["*"], "DstPorts": {"IP": "*", "Ports": {"First": 1, "Last": 2}}}], "tail0", "t"),
        ([{"SrcIPs": ["*"], "DstPorts": [{"IP": "*"}]}], "tail0", "t"),
        ([{"SrcIPs": ["*"], "DstPorts": [{"IP": None, "Ports": {"First": 1, "Last": 2}}]}], "tail0", "t"),
        ([{"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": [1, 2]}]}], "tail0", "t"),
        ([{"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 1}}]}], "tail0", "t"),
        ([{"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65536}}]}], "tail0", "t"),
        ([{"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": -1, "Last": 5}}]}], "tail0", "t"),
        ([{"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": "22", "Last": 22}}]}], "tail0", "t"),
        ([{"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 2.5, "Last": 22}}]}], "tail0", "t"),
        ([{"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": True, "Last": 22}}]}], "tail0", "t"),
        ([{"SrcIPs": ["100.64.0.0/33"], "DstPorts": []}], "tail0", "t"),
        ([{"SrcIPs": ["1.2.3.4-"], "DstPorts": []}], "tail0", "t"),
        ([{"SrcIPs": ["1.2.3.9-1.2.3.4"], "DstPorts": []}], "tail0", "t"),
        ([{"SrcIPs": ["1.2.3.4-::1"], "DstPorts": []}], "tail0", "t"),
        ([{"SrcIPs": ["fe80::1%x } accept"], "DstPorts": []}], "tail0", "t"),  # would inject into the script
        ([{"SrcIPs": ["*"], "DstPorts": [{"IP": "fe80::1%eth0", "Ports": {"First": 1, "Last": 1}}]}], "tail0", "t"),
        ([{"SrcIPs": ["*"], "DstPorts": [], "IPProto": [256]}], "tail0", "t"),
        ([{"SrcIPs": ["*"], "DstPorts": [], "IPProto": ["tcp"]}], "tail0", "t"),
        ([{"SrcIPs": ["*"], "DstPorts": [], "IPProto": 6}], "tail0", "t"),
        ([None], "tail0", "t"),
        ([["SrcIPs"]], "tail0", "t"),
        ({"SrcIPs": ["*"]}, "tail0", "t"),
        ([], None, "t"),
    ],
)
def test_bad_input(rules: Any, iface: Any, table: str) -> None:
    with pytest.raises(RenderError):
        render(rules, iface, table=table)


@pytest.mark.parametrize("own", [["100.64.0.2-100.64.0.3"], ["fe80::1%eth0"], [None], ["*"], ["nope"]])
def test_bad_own_address(own: Any) -> None:
    with pytest.raises(RenderError):
        render([], "tail0", own)


# --- fuzz: whatever the server sends, render() returns a script or raises RenderError --------------------

ADDRS = st.one_of(
    st.sampled_from(["*", "100.64.0.1", "100.64.0.0/10", "fd7a:115c:a1e0::1/128", "100.64.0.5-100.64.0.9",
                     "fd7a:115c:a1e0::1-fd7a:115c:a1e0::9", "10.0.0.0/8", "0.0.0.0/0", "::/0"]),
    st.ip_addresses().map(str),
    st.tuples(st.ip_addresses(v=4), st.integers(0, 32)).map(lambda t: f"{t[0]}/{t[1]}"),
)
JUNK: st.SearchStrategy[Any] = st.one_of(
    st.none(), st.booleans(), st.integers(-70000, 70000), st.floats(allow_nan=True), st.text(max_size=20),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
PORTS = st.fixed_dictionaries({"First": st.integers(0, 65535), "Last": st.integers(0, 65535)})
GOOD_RULE = st.fixed_dictionaries(
    {"SrcIPs": st.lists(ADDRS, max_size=4),
     "DstPorts": st.lists(st.fixed_dictionaries({"IP": ADDRS, "Ports": PORTS}), max_size=3)},
    optional={"IPProto": st.one_of(st.none(), st.lists(st.sampled_from([1, 6, 17, 58, 132, 47, 0, 255]),
                                                       max_size=4))},
)


def _mutate(rule: dict[str, Any], data: st.DataObject) -> Any:
    """Breaks one part of a well-formed rule: a field, an element, or the rule itself."""
    where = data.draw(st.sampled_from(["rule", "SrcIPs", "src", "DstPorts", "dp", "IP", "Ports", "port",
                                       "IPProto", "proto", "drop"]))
    junk = data.draw(JUNK)
    if where == "rule":
        return junk
    if where == "drop":
        rule.pop(data.draw(st.sampled_from(["SrcIPs", "DstPorts"])))
    elif where in ("SrcIPs", "DstPorts", "IPProto"):
        rule[where] = junk
    elif where == "src":
        rule["SrcIPs"] = [*rule["SrcIPs"], junk]
    elif where == "proto":
        rule["IPProto"] = [*(rule.get("IPProto") or []), junk]
    elif rule["DstPorts"]:
        dp = dict(rule["DstPorts"][0])
        if where == "dp":
            dp = junk
        elif where in ("IP", "Ports"):
            dp[where] = junk
        else:
            dp["Ports"] = {**dp["Ports"], data.draw(st.sampled_from(["First", "Last"])): junk}
        rule["DstPorts"] = [dp, *rule["DstPorts"][1:]]
    return rule


@given(st.lists(GOOD_RULE, max_size=4))
def test_fuzz_wellformed_rules_render(rules: list[dict[str, Any]]) -> None:
    bad_range = any(p["Ports"]["First"] > p["Ports"]["Last"] for r in rules for p in r["DstPorts"])
    try:
        text = render(rules, "tail0", ["100.64.0.2", "fd7a:115c:a1e0::2"])
    except RenderError:
        assert bad_range
        return
    assert not bad_range
    assert text.endswith("counter name dropped drop\n\t}\n}\n")


@given(st.lists(GOOD_RULE, min_size=1, max_size=3), st.data())
def test_fuzz_malformed_rules_raise_render_error_only(rules: list[dict[str, Any]], data: st.DataObject) -> None:
    i = data.draw(st.integers(0, len(rules) - 1))
    rules[i] = _mutate(rules[i], data)
    with contextlib.suppress(RenderError):
        render(rules, "tail0", ["100.64.0.2"])


@given(st.lists(st.one_of(st.text(max_size=30), JUNK, st.lists(JUNK, max_size=3)), max_size=3))
def test_fuzz_arbitrary_rule_lists(rules: list[Any]) -> None:
    with contextlib.suppress(RenderError):
        render(rules, "tail0")


NEEDS_NFT = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("ip"),
                               reason="needs root, nft")


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    ns = f"shoaltest-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def nft_check(ns: str, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, "nft", "-c", "-f", "-"], input=script, text=True,
                          capture_output=True)


@NEEDS_NFT
def test_nft_accepts_rendered_script(netns: str) -> None:
    for rules in ([], SSH_ONLY, SHAPES):
        script = render(rules, "shoal0", OWN, table="shoal_test")
        r = nft_check(netns, script)
        assert r.returncode == 0, r.stderr + script


@NEEDS_NFT
def test_nft_accepts_every_fuzzed_script(netns: str) -> None:
    # one nft run for many generated rule sets: anything render() lets through, nft must load
    scripts: list[str] = []

    @given(st.lists(GOOD_RULE, max_size=3))
    def collect(rules: list[dict[str, Any]]) -> None:
        with contextlib.suppress(RenderError):
            scripts.append(render(rules, "shoal0", OWN, table=f"t{len(scripts)}"))

    collect()
    assert len(scripts) > 10
    r = nft_check(netns, "".join(scripts))
    assert r.returncode == 0, r.stderr


# --- always-on rules and the applier (issue 11) ---------------------------------------------------------------

SPOOF = [
    'iifname != { "lo", "tail0" } ip saddr 100.64.0.0/10 counter name spoofed drop',
    'iifname != { "lo", "tail0" } ip6 saddr fd7a:115c:a1e0::/48 counter name spoofed drop',
]


def _chain(text: str, name: str) -> list[str]:
    lines = [x.strip() for x in text.splitlines()]
    start = lines.index(f"chain {name} {{") + 1
    return lines[start : lines.index("}", start)]


@pytest.mark.parametrize("kind", ["policy", "empty", "allow_all"])
def test_dns_every_table_drops_quad100_from_the_tunnel(kind: str) -> None:
    test_sec_every_table_drops_tailnet_sources_off_the_tunnel(kind)


@pytest.mark.parametrize("kind", ["policy", "empty", "allow_all"])
def test_sec_every_table_drops_tailnet_sources_off_the_tunnel(kind: str) -> None:
    from node.render.nft import render_allow_all

    text = {"policy": lambda: render(SSH_ONLY, "tail0", OWN), "empty": lambda: render([], "tail0", OWN),
            "allow_all": lambda: render_allow_all("tail0", OWN)}[kind]()
    for chain, hook in (("input", "input"), ("forward", "forward")):
        assert _chain(text, chain) == [f"type filter hook {hook} priority filter; policy accept;", *SPOOF,
                                       'iifname "tail0" jump from_tailnet']
    # our own addresses arriving from the tunnel are never a peer's; quad-100 is never reachable from it
    body = _chain(text, "from_tailnet")
    assert body[:5] == [*QUAD100_DROPS, "ct state established,related accept",
                        "ip saddr @self4 counter name dropped drop", "ip6 saddr @self6 counter name dropped drop"]
    assert body[-1] == {"policy": "counter name dropped drop", "empty": "counter name dropped drop",
                        "allow_all": "accept"}[kind]


def test_sec_allow_all_table_loads(netns: str) -> None:
    from node.render.nft import render_allow_all

    r = nft_check(netns, render_allow_all("tail0", OWN))
    assert r.returncode == 0, r.stderr


def test_sec_applier_skips_what_is_in_place_and_keeps_it_on_failure() -> None:
    import asyncio

    from node.render.nft import NftApplier, delete_script
    from node.run import FakeRunner, Result

    runner = FakeRunner()
    nft = NftApplier(runner)

    async def go() -> None:
        assert await nft.set("table inet shoal_filter {}\n")
        assert not await nft.set("table inet shoal_filter {}\n")
        runner.responses["nft -f -"] = Result(1, "", "Error: broken")
        with pytest.raises(Exception, match="broken"):
            await nft.set("table inet other {}\n")
        assert nft.applied == "table inet shoal_filter {}\n"
        runner.responses.clear()
        await nft.clear()
        assert nft.applied is None
        await nft.clear()

    asyncio.run(go())
    assert runner.transcript == (
        "nft -f -\n    table inet shoal_filter {}\n"
        "nft -f -\n    table inet other {}\n"
        "nft -f -\n" + "".join(f"    {line}\n" for line in delete_script().splitlines())
    )
