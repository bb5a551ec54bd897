"""UAPI codec and config diff: golden text both ways, idempotence, and fuzzing of the reply parser."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.keys import PrivateKey, PublicKey
from node.wg import uapi
from node.wg.config import (
    ConfigError,
    DeviceState,
    DeviceUpdate,
    PeerState,
    PeerUpdate,
    WgConfig,
    WgPeer,
    canonical_endpoint,
    plan,
)

PRIV = PrivateKey(bytes(range(1, 33)))
A = PublicKey(bytes([0xAA] * 32))
B = PublicKey(bytes([0xBB] * 32))
C = PublicKey(bytes([0xCC] * 32))

GET_REPLY = (
    f"private_key={PRIV.hex}\n"
    "listen_port=41641\n"
    f"public_key={A.hex}\n"
    "preshared_key=0000000000000000000000000000000000000000000000000000000000000000\n"
    "protocol_version=1\n"
    "endpoint=192.0.2.10:41641\n"
    "last_handshake_time_sec=1700000000\n"
    "last_handshake_time_nsec=500000000\n"
    "tx_bytes=1024\n"
    "rx_bytes=2048\n"
    "persistent_keepalive_interval=25\n"
    "allowed_ip=100.64.0.2/32\n"
    "allowed_ip=fd7a:115c:a1e0::2/128\n"
    f"public_key={B.hex}\n"
    "protocol_version=1\n"
    "endpoint=[2001:db8::1]:51820\n"
    "last_handshake_time_sec=0\n"
    "last_handshake_time_nsec=0\n"
    "tx_bytes=0\n"
    "rx_bytes=0\n"
    "persistent_keepalive_interval=0\n"
    "allowed_ip=100.64.0.3/32\n"
    "errno=0\n\n"
).encode()

CURRENT = DeviceState(
    PRIV,
    41641,
    (
        PeerState(
            A, ("100.64.0.2/32", "fd7a:115c:a1e0::2/128"), "192.0.2.10:41641", 25, 1700000000.5, 2048, 1024
        ),
        PeerState(B, ("100.64.0.3/32",), "[2001:db8::1]:51820", 0, None, 0, 0),
    ),
)


def test_parse_get_golden() -> None:
    assert uapi.parse_get(GET_REPLY) == CURRENT


def test_render_set_golden() -> None:
    update = DeviceUpdate(
        PRIV,
        41641,
        (
            PeerUpdate(B, remove=True),
            PeerUpdate(C, endpoint="198.51.100.7:41641", persistent_keepalive=25,
                       allowed_ips=("100.64.0.4/32", "10.1.0.0/16")),
            PeerUpdate(A, endpoint="[2001:db8::2]:41641"),
        ),
    )
    assert uapi.render_set(update).decode() == (
        "set=1\n"
        f"private_key={PRIV.hex}\n"
        "listen_port=41641\n"
        f"public_key={B.hex}\n"
        "remove=true\n"
        f"public_key={C.hex}\n"
        "endpoint=198.51.100.7:41641\n"
        "persistent_keepalive_interval=25\n"
        "replace_allowed_ips=true\n"
        "allowed_ip=100.64.0.4/32\n"
        "allowed_ip=10.1.0.0/16\n"
        f"public_key={A.hex}\n"
        "endpoint=[2001:db8::2]:41641\n"
        "\n"
    )


def test_plan_same_config_is_empty() -> None:
    desired = WgConfig(
        PRIV,
        41641,
        (
            WgPeer(A, ("fd7a:115c:a1e0::2/128", "100.64.0.2/32"), "192.0.2.10:41641", 25),
            WgPeer(B, ("100.64.0.3/32",), None, 0),  # no endpoint wanted: keep what the device learnt
        ),
    )
    assert plan(desired, CURRENT).empty


def test_plan_changes_only_what_differs() -> None:
    desired = WgConfig(
        PRIV,
        41641,
        (
            WgPeer(A, ("100.64.0.2/32", "fd7a:115c:a1e0::2/128", "10.9.0.0/24"), "192.0.2.10:41641", 25),
            WgPeer(C, ("100.64.0.4/32",), "203.0.113.5:41641"),
        ),
    )
    assert plan(desired, CURRENT) == DeviceUpdate(
        None,
        None,
        (
            PeerUpdate(B, remove=True),
            PeerUpdate(A, allowed_ips=("10.9.0.0/24", "100.64.0.2/32", "fd7a:115c:a1e0::2/128")),
            PeerUpdate(C, endpoint="203.0.113.5:41641", allowed_ips=("100.64.0.4/32",)),
        ),
    )


def test_plan_new_key_and_port() -> None:
    other = PrivateKey.generate()
    update = plan(WgConfig(other, 5000, ()), DeviceState(None, 0, ()))
    assert update == DeviceUpdate(other, 5000, ())


def test_errno_and_malformed_replies() -> None:
    uapi.check_set_reply(b"errno=0\n\n")
    with pytest.raises(uapi.UapiError, match="errno=22"):
        uapi.check_set_reply(b"errno=22\n\n")
    for bad, msg in [
        (b"listen_port=1\n\n", "no errno"),
        (b"listen_port=x\nerrno=0\n\n", "not a number"),
        (b"public_key=abc\nerrno=0\n\n", "public_key"),
        (b"garbage\nerrno=0\n\n", "without '='"),
        (f"public_key={A.hex}\nallowed_ip=300.0.0.0/8\nerrno=0\n\n".encode(), "not a CIDR"),
        (f"public_key={A.hex}\nendpoint=fd00::1:5\nerrno=0\n\n".encode(), "brackets"),
    ]:
        with pytest.raises(uapi.UapiError, match=msg):
            uapi.parse_get(bad)


def test_reply_complete() -> None:
    assert not uapi.reply_complete(b"listen_port=1\n")
    assert not uapi.reply_complete(b"listen_port=1\nerrno=0\n")
    assert uapi.reply_complete(b"listen_port=1\nerrno=0\n\n")
    assert uapi.reply_complete(b"errno=0\n\n")


def test_config_validation() -> None:
    assert canonical_endpoint("[::ffff:192.0.2.1]:5") == "192.0.2.1:5"
    with pytest.raises(ConfigError, match="not host:port"):
        WgPeer(A, (), "192.0.2.1")
    with pytest.raises(ConfigError, match="out of range"):
        WgPeer(A, (), "192.0.2.1:70000")
    with pytest.raises(ConfigError, match="not a CIDR"):
        WgPeer(A, ("100.64.0.1/33",))
    with pytest.raises(ConfigError, match="listed twice"):
        WgConfig(PRIV, 1, (WgPeer(A), WgPeer(A)))
    assert WgPeer(A, ("100.64.0.7/24",)).allowed_ips == ("100.64.0.0/24",)


LINE_KEYS = st.sampled_from(
    ["private_key", "listen_port", "fwmark", "public_key", "endpoint", "allowed_ip", "rx_bytes", "tx_bytes",
     "last_handshake_time_sec", "persistent_keepalive_interval", "protocol_version", "errno", ""]
)


@given(st.lists(st.tuples(LINE_KEYS, st.text(max_size=70)), max_size=20), st.binary(max_size=40))
def test_parse_get_fuzz_only_raises_uapi_error(lines: list[tuple[str, str]], tail: bytes) -> None:
    body = "".join(f"{k}={v}\n" for k, v in lines).encode("utf-8", "replace") + tail
    for reply in (body, body + b"errno=0\n\n"):
        try:
            state = uapi.parse_get(reply)
        except uapi.UapiError:
            continue
        assert isinstance(state, DeviceState)


@given(st.binary(max_size=300))
def test_parse_get_fuzz_bytes(data: bytes) -> None:
    with contextlib.suppress(uapi.UapiError):
        uapi.parse_get(data)


@given(
    st.lists(
        st.tuples(
            st.sampled_from([A, B, C]),
            st.lists(st.sampled_from(["100.64.0.1/32", "10.0.0.0/8", "fd7a:115c:a1e0::1/128"]), max_size=3),
            st.one_of(st.none(), st.sampled_from(["192.0.2.1:1", "[2001:db8::1]:2"])),
            st.integers(0, 30),
        ),
        max_size=3,
        unique_by=lambda t: t[0].raw,
    )
)
def test_plan_then_apply_reaches_desired(peers: list[tuple[PublicKey, list[str], str | None, int]]) -> None:
    desired = WgConfig(PRIV, 41641, tuple(WgPeer(k, tuple(ips), ep, ka) for k, ips, ep, ka in peers))
    after = simulate(CURRENT, plan(desired, CURRENT))
    assert plan(desired, after).empty


def simulate(state: DeviceState, update: DeviceUpdate) -> DeviceState:
    """What a device does with an update, by the protocol's rules: the reference for the planner."""
    peers = {p.public_key.raw: p for p in state.peers}
    for u in update.peers:
        if u.remove:
            peers.pop(u.public_key.raw, None)
            continue
        old = peers.get(u.public_key.raw, PeerState(u.public_key))
        peers[u.public_key.raw] = PeerState(
            u.public_key,
            u.allowed_ips if u.allowed_ips is not None else old.allowed_ips,
            u.endpoint if u.endpoint is not None else old.endpoint,
            u.persistent_keepalive if u.persistent_keepalive is not None else old.persistent_keepalive,
        )
    return DeviceState(
        update.private_key or state.private_key,
        update.listen_port or state.listen_port,
        tuple(peers.values()),
    )
