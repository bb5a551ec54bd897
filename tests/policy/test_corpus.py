# ruff: noqa: E501  (the skip table quotes reasons verbatim)
"""The corpus of real Tailscale policy files: every file parses or is refused precisely, and every `tests`
assertion passes or is skipped for a stated lack of tailnet state (listed below). None may fail.

Tailnet state for a file, where its own comments make it plain, lives in tests/policy_tailnets/<file>.json.
The corpus is external (tests/policy/corpus.py says where and how a missing one is handled).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from coord.policy import PolicyError, check, parse

from . import corpus

TAILNETS = Path(__file__).resolve().parents[1] / "policy_tailnets"

# Files Tailscale itself would refuse, with the precise error we give.
REFUSED = {
    "ejsadiarin__core-k8s-homelab__tailscale-acl.json": ":69:9: acls[0].dst[0]: 'tag:worker' has no ports",
    "georgepstaylor__lab-tailscale-config__policy": ":15:9: acls[1].src[0]: group 'group:gs_vnet' is not defined",
}

# Assertions we cannot decide without tailnet state nobody wrote down: (test index, src, dst, reason).
# Mostly role autogroups (who is admin/owner) and which device owns a host address.
SKIPPED: dict[str, list[tuple[int, str, str, str]]] = {
    "BCNelson__nix-config__tailscale-acl": [
        (
            1,
            "group:nelsonFamily",
            "vor:22",
            "the addresses of group:nelsonFamily are not known; which device owns vor is not known; which devices own group:nelsonFamily and vor is not known",
        ),
        (
            2,
            "romeo",
            "vor:22",
            "which device owns romeo is not known; which device owns vor is not known; which devices own romeo and vor is not known",
        ),
        (
            2,
            "romeo",
            "xray:22",
            "which device owns romeo is not known; which device owns xray is not known; which devices own romeo and xray is not known",
        ),
        (
            2,
            "romeo",
            "porter-pc:22",
            "which device owns romeo is not known; which device owns porter-pc is not known; which devices own romeo and porter-pc is not known",
        ),
        (3, "whiskey", "romeo:9100", "which device owns whiskey is not known; which device owns romeo is not known"),
        (3, "whiskey", "vor:9100", "which device owns whiskey is not known; which device owns vor is not known"),
        (
            3,
            "whiskey",
            "xray:22",
            "which device owns whiskey is not known; which devices own whiskey and xray is not known",
        ),
        (
            3,
            "whiskey",
            "porter-pc:22",
            "which device owns whiskey is not known; which devices own whiskey and porter-pc is not known",
        ),
        (4, "romeo", "whiskey:9100", "which device owns romeo is not known"),
    ],
    "HomeScaleCloud__homescale-public__infra_tailscale_policy": [
        (
            0,
            "100.124.169.104",
            "tag:admin-app:443",
            "which device owns 100.124.169.104 is not known; posture attribute node:osVersion of 100.124.169.104 is not known; posture attribute node:tsVersion of 100.124.169.104 is not known",
        ),
        (1, "100.86.77.56", "tag:app:443", "which device owns 100.86.77.56 is not known"),
        (1, "100.86.77.56", "tag:admin-app:443", "which device owns 100.86.77.56 is not known"),
    ],
    "abl030__nixosconfig__tailscale_acl": [
        (13, "tag:edge", "tag:server:443", "the addresses of tag:edge are not known"),
        (14, "tag:share", "tag:server:443", "the addresses of tag:share are not known"),
    ],
    "ananthb__machines__policy": [
        (3, "tag:infrastructure", "tag:server:22", "the addresses of tag:server are not known"),
    ],
    "cedi__dotfiles__tailscale.acl": [
        (
            1,
            "x1bay@github",
            "hass:8123",
            "whether x1bay@github is a member of the tailnet is not known; which device owns hass is not known",
        ),
        (
            1,
            "x1bay@github",
            "hass-schiltach:8123",
            "whether x1bay@github is a member of the tailnet is not known; which device owns hass-schiltach is not known",
        ),
        (10, "clusterpi-leader", "tag:core-infra:3493", "which device owns clusterpi-leader is not known"),
    ],
    "davafons__davafons-infra__tailscale_policy": [
        (0, "davafons@gmail.com", "tag:nadeshiko:443", "the roles of davafons@gmail.com (admin?) are not known"),
        (0, "davafons@gmail.com", "tag:inari:443", "the roles of davafons@gmail.com (admin?) are not known"),
        (0, "davafons@gmail.com", "tag:monitoring:443", "the roles of davafons@gmail.com (admin?) are not known"),
        (0, "davafons@gmail.com", "tag:qtower:443", "the roles of davafons@gmail.com (admin?) are not known"),
        (0, "davafons@gmail.com", "tag:watchtower:443", "the roles of davafons@gmail.com (admin?) are not known"),
    ],
    "etherport__infra__infra_tailscale_policy": [
        (
            0,
            "sparked-diamond@github",
            "tag:k8s:32400",
            "whether sparked-diamond@github is a member of the tailnet is not known; the addresses of tag:k8s are not known",
        ),
        (
            0,
            "sparked-diamond@github",
            "tag:k8s:5432",
            "whether sparked-diamond@github is a member of the tailnet is not known; the addresses of tag:k8s are not known",
        ),
        (
            0,
            "sparked-diamond@github",
            "10.10.201.70:443",
            "whether sparked-diamond@github is a member of the tailnet is not known",
        ),
        (
            0,
            "sparked-diamond@github",
            "10.10.201.50:6443",
            "whether sparked-diamond@github is a member of the tailnet is not known",
        ),
        (
            0,
            "sparked-diamond@github",
            "10.10.100.10:53",
            "whether sparked-diamond@github is a member of the tailnet is not known",
        ),
    ],
    "gruberdev__homelab__policy": [
        (
            0,
            "tag:internal",
            "tag:k8s:5678",
            "the addresses of tag:internal are not known; the addresses of tag:k8s are not known",
        ),
        (
            0,
            "tag:internal",
            "tag:nodes:5678",
            "the addresses of tag:internal are not known; the addresses of tag:nodes are not known",
        ),
        (
            0,
            "tag:internal",
            "tag:clients:80",
            "the addresses of tag:internal are not known; the addresses of tag:clients are not known",
        ),
        (
            1,
            "tag:database",
            "tag:nodes:5432",
            "the addresses of tag:database are not known; the addresses of tag:nodes are not known",
        ),
        (
            2,
            "tag:k8s",
            "tag:clients:22",
            "the addresses of tag:k8s are not known; the addresses of tag:clients are not known",
        ),
        (
            3,
            "tag:matrix",
            "tag:clients:80",
            "the addresses of tag:matrix are not known; the addresses of tag:clients are not known",
        ),
    ],
    "jonpulsifer__infra__terraform_network_tailscale_policy": [
        (
            0,
            "jonathan@pulsifer.ca",
            "jonathan@pulsifer.ca:22",
            "the roles of jonathan@pulsifer.ca (owner?) are not known; the addresses of jonathan@pulsifer.ca are not known",
        ),
        (1, "jonathan@pulsifer.ca", "10.3.0.10:22", "the roles of jonathan@pulsifer.ca (owner?) are not known"),
        (1, "jonathan@pulsifer.ca", "10.3.0.70:443", "the roles of jonathan@pulsifer.ca (owner?) are not known"),
        (2, "jonathan@pulsifer.ca", "10.1.0.1:443", "the roles of jonathan@pulsifer.ca (owner?) are not known"),
        (2, "jonathan@pulsifer.ca", "10.2.0.20:53", "the roles of jonathan@pulsifer.ca (owner?) are not known"),
        (2, "jonathan@pulsifer.ca", "10.89.0.1:443", "the roles of jonathan@pulsifer.ca (owner?) are not known"),
        (2, "jonathan@pulsifer.ca", "192.168.1.1:443", "the roles of jonathan@pulsifer.ca (owner?) are not known"),
        (
            3,
            "jonathan@pulsifer.ca",
            "tag:lab-host:22",
            "the roles of jonathan@pulsifer.ca (owner?) are not known; the addresses of tag:lab-host are not known",
        ),
    ],
    "keiretsu-labs__kubernetes-manifests__tailscale_policy": [
        (
            3,
            "rajsinghcpre@gmail.com",
            "svc:ottawa-home-envoy-gateway:22",
            "whether rajsinghcpre@gmail.com is a member of the tailnet is not known",
        ),
        (
            3,
            "rajsinghcpre@gmail.com",
            "svc:ottawa-home-envoy-gateway:443",
            "whether rajsinghcpre@gmail.com is a member of the tailnet is not known",
        ),
        (
            3,
            "rajsinghcpre@gmail.com",
            "svc:robbinsdale-home-envoy-gateway:443",
            "whether rajsinghcpre@gmail.com is a member of the tailnet is not known",
        ),
        (
            3,
            "rajsinghcpre@gmail.com",
            "svc:stpetersburg-home-envoy-gateway:80",
            "whether rajsinghcpre@gmail.com is a member of the tailnet is not known",
        ),
        (
            3,
            "rajsinghcpre@gmail.com",
            "tag:k8s-operator:443",
            "whether rajsinghcpre@gmail.com is a member of the tailnet is not known",
        ),
        (
            4,
            "rajsinghcpre@gmail.com",
            "svc:robbinsdale-home-envoy-gateway:53",
            "whether rajsinghcpre@gmail.com is a member of the tailnet is not known",
        ),
    ],
    "keiretsu-labs__tailscale-kubernetes-demo__tailscale_policy": [
        (
            0,
            "rajsinghcpre@gmail.com",
            "rajsinghcpre@gmail.com:53",
            "whether rajsinghcpre@gmail.com is a member of the tailnet is not known; the roles of rajsinghcpre@gmail.com (admin?) are not known; the addresses of rajsinghcpre@gmail.com are not known",
        ),
        (
            0,
            "rajsinghcpre@gmail.com",
            "tag:k8s-operator:443",
            "the roles of rajsinghcpre@gmail.com (admin?) are not known; the addresses of tag:k8s-operator are not known; whether rajsinghcpre@gmail.com is a member of the tailnet is not known",
        ),
        (
            0,
            "rajsinghcpre@gmail.com",
            "tag:k8s:443",
            "the roles of rajsinghcpre@gmail.com (admin?) are not known; the addresses of tag:k8s are not known; whether rajsinghcpre@gmail.com is a member of the tailnet is not known",
        ),
    ],
    "lestherll__homelab__tailscale-acl_policy": [
        (0, "lestherll@github", "tag:k8s:443", "whether lestherll@github is a member of the tailnet is not known"),
        (0, "lestherll@github", "tag:k8s:80", "whether lestherll@github is a member of the tailnet is not known"),
        (
            1,
            "lestherll@github",
            "homelab:22",
            "whether lestherll@github is a member of the tailnet is not known; which devices own lestherll@github and homelab is not known",
        ),
    ],
    "madsbv__nix__policy": [
        (0, "madsbv@github", "tag:ephemeral:22", "the roles of madsbv@github (admin?) are not known"),
        (0, "madsbv@github", "madsbv@github:22", "the roles of madsbv@github (admin?) are not known"),
    ],
    "michaelahern__casa-cirrus-tailscale__policy": [
        (0, "michaelahern@github", "192.168.1.1:443", "the roles of michaelahern@github (admin?) are not known"),
        (0, "michaelahern@github", "192.168.20.1:443", "the roles of michaelahern@github (admin?) are not known"),
        (0, "michaelahern@github", "192.168.180.1:443", "the roles of michaelahern@github (admin?) are not known"),
        (1, "michaelahern@github", "tag:casa-canyaa:443", "the roles of michaelahern@github (admin?) are not known"),
        (1, "michaelahern@github", "tag:casa-mobilia:443", "the roles of michaelahern@github (admin?) are not known"),
        (1, "michaelahern@github", "tag:casa-cirrus:443", "the roles of michaelahern@github (admin?) are not known"),
    ],
    "murar8__home-server__tofu_policy": [
        (
            0,
            "murar8@github",
            "100.93.230.82:22",
            "whether murar8@github is a member of the tailnet is not known; which device owns 100.93.230.82 is not known",
        ),
        (
            0,
            "murar8@github",
            "100.90.169.56:22",
            "whether murar8@github is a member of the tailnet is not known; which device owns 100.90.169.56 is not known",
        ),
        (
            0,
            "murar8@github",
            "100.94.207.109:22",
            "whether murar8@github is a member of the tailnet is not known; which device owns 100.94.207.109 is not known",
        ),
        (1, "murar8@github", "192.168.1.1:80", "whether murar8@github is a member of the tailnet is not known"),
        (1, "murar8@github", "192.168.1.130:22", "whether murar8@github is a member of the tailnet is not known"),
    ],
    "nlopez__tailnet__policy": [
        (1, "tag:admin", "tag:work:22", "the addresses of tag:work are not known"),
    ],
    "rajsinghtech__kubernetes-manifests__tailscale_policy": [
        (
            1,
            "rajsinghtech@github",
            "rajsinghtech@github:53",
            "whether rajsinghtech@github is a member of the tailnet is not known; the addresses of rajsinghtech@github are not known",
        ),
    ],
}


@pytest.mark.corpus
def test_corpus_is_complete() -> None:
    want = corpus.manifest()
    got = {p.name: p for p in corpus.path(".").glob("*.hujson")}
    assert sorted(got) == sorted(want)
    for name, p in got.items():
        assert hashlib.sha256(p.read_bytes()).hexdigest() == want[name], f"{name} differs from corpus.sha256"
    assert len(want) == 66
    with_tests = [n for n in want if corpus.stem(n) not in REFUSED and parse(got[n].read_bytes(), n).tests]
    assert len(with_tests) == 33


@pytest.mark.corpus
@pytest.mark.parametrize("name", corpus.NAMES, ids=corpus.stem)
def test_parses_or_refused_precisely(name: str) -> None:
    path = corpus.path(name)
    if path.stem in REFUSED:
        with pytest.raises(PolicyError) as e:
            parse(path.read_bytes(), path.name)
        assert REFUSED[path.stem] in str(e.value)
    else:
        parse(path.read_bytes(), path.name)


@pytest.mark.corpus
def test_all_assertions_pass_or_are_listed_skips() -> None:
    total = passed = 0
    for name in corpus.NAMES:
        path = corpus.path(name)
        if path.stem in REFUSED:
            continue
        tn_file = TAILNETS / f"{path.stem}.json"
        tailnet = json.loads(tn_file.read_text()) if tn_file.exists() else None
        r = check(path.read_bytes(), tailnet, path.name)
        assert not r["errors"], r["errors"]
        assert r["failed"] == [], (path.stem, r["failed"])
        got = [(s["test"], s["src"], s["dst"], s["reason"]) for s in r["skipped"]]
        assert got == SKIPPED.get(path.stem, []), path.stem
        assert r["passed"] + len(r["skipped"]) == r["assertions"]
        total += r["assertions"]
        passed += r["passed"]
    assert total == 526
    assert passed == 526 - sum(len(v) for v in SKIPPED.values())


def test_tailnet_files_and_tables_match_the_manifest() -> None:
    stems = {corpus.stem(n) for n in corpus.NAMES}
    for f in TAILNETS.glob("*.json"):
        assert f.stem in stems, f.name
    assert set(REFUSED) <= stems and set(SKIPPED) <= stems


# sshTests assertions we cannot decide without tailnet state nobody wrote down: (file, sshTests index, user,
# expected, reason). Everything else in every file with sshTests must pass.
SSH_SKIPPED = [
    (
        "c4patino__dotfiles__policy",
        0,
        "autogroup:nonroot",
        "accept",
        "the roles of c4patino@gmail.com (owner?) are not known",
    ),
    ("cedi__dotfiles__tailscale.acl", 0, "cedi", "accept", "which device owns nuc is not known"),
    ("cedi__dotfiles__tailscale.acl", 1, "cedi", "accept", "which device owns nuc is not known"),
    ("cedi__dotfiles__tailscale.acl", 1, "root", "check", "which device owns nuc is not known"),
    (
        "keiretsu-labs__kubernetes-manifests__tailscale_policy",
        0,
        "root",
        "accept",
        "whether rajsinghtech@github is a member of the tailnet is not known",
    ),
    (
        "keiretsu-labs__kubernetes-manifests__tailscale_policy",
        0,
        "workspace",
        "accept",
        "whether rajsinghtech@github is a member of the tailnet is not known",
    ),
    (
        "keiretsu-labs__kubernetes-manifests__tailscale_policy",
        0,
        "rajsingh",
        "accept",
        "whether rajsinghtech@github is a member of the tailnet is not known",
    ),
    (
        "madsbv__nix__policy",
        2,
        "builder",
        "accept",
        "the roles of madsbv@github (admin?) are not known; whether madsbv@github is a member of the tailnet is not known",
    ),
    (
        "madsbv__nix__policy",
        2,
        "mvilladsen",
        "accept",
        "the roles of madsbv@github (admin?) are not known; whether madsbv@github is a member of the tailnet is not known",
    ),
    (
        "madsbv__nix__policy",
        2,
        "root",
        "accept",
        "the roles of madsbv@github (admin?) are not known; whether madsbv@github is a member of the tailnet is not known",
    ),
    ("stepbrobd__tailscale-acls__policy", 0, "ysun", "accept", "the roles of ysun@hey.com (admin?) are not known"),
]


@pytest.mark.corpus
def test_ssh_corpus_ssh_tests_pass_or_are_listed_skips() -> None:
    files = total = passed = 0
    skipped: list[tuple[str, int, str, str, str]] = []
    for name in corpus.NAMES:
        path = corpus.path(name)
        if path.stem in REFUSED:
            continue
        tn_file = TAILNETS / f"{path.stem}.json"
        tailnet = json.loads(tn_file.read_text()) if tn_file.exists() else None
        r = check(path.read_bytes(), tailnet, path.name)
        if not parse(path.read_bytes(), path.name).ssh_tests:
            assert r["ssh_assertions"] == 0
            continue
        files += 1
        assert r["ssh_assertions"] > 0, path.stem
        assert r["ssh_failed"] == [], (path.stem, r["ssh_failed"])
        skipped += [(path.stem, s["ssh_test"], s["user"], s["expected"], s["reason"]) for s in r["ssh_skipped"]]
        assert r["ssh_passed"] + len(r["ssh_skipped"]) == r["ssh_assertions"]
        total += r["ssh_assertions"]
        passed += r["ssh_passed"]
    assert skipped == SSH_SKIPPED
    assert (files, total, passed) == (11, 67, 56)


@pytest.mark.corpus
def test_nodeattr_corpus_attributes_are_listed_not_applied() -> None:
    files = 0
    reasons: dict[str, int] = {}
    for name in corpus.NAMES:
        path = corpus.path(name)
        if path.stem in REFUSED:
            continue
        r = check(path.read_bytes(), None, path.name)
        files += bool(r["node_attrs"])
        for a in r["node_attrs"]:
            assert a["applied"] is False
            reasons[a["reason"]] = reasons.get(a["reason"], 0) + 1
    assert files == 29
    assert reasons == {
        "Shoal has no Funnel (public ingress)": 35,
        "Shoal has no Mullvad exit nodes": 22,
        "Shoal has no Taildrive": 22,
        "Shoal's MagicDNS has no NextDNS resolver": 6,
        "exit nodes are chosen by the client (shoal up), not by attribute": 2,
        "not applied by Shoal's MagicDNS": 1,
        "Shoal has no Taildrop": 1,
        "Shoal has no traffic steering": 1,
    }
