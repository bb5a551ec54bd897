"""The sans-IO handshake and registry, with no sockets: time is passed in."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nacl.public import Box, PrivateKey

from derp import frames as f
from derp.protocol import (
    NEED_DATA,
    ClientAuthenticated,
    ClientInfoJSON,
    Connected,
    DerpConnection,
    HandshakeError,
    LocalProtocolError,
    RemoteProtocolError,
    Role,
    State,
    _go_fold,
)
from derp.registry import DUPLICATE_PROBLEM, Announce, Registry, SendHealth, SendPeerGone

SERVER = bytes(PrivateKey.generate())
CLIENT = bytes(PrivateKey.generate())


def drain(conn: DerpConnection) -> list[object]:
    out: list[object] = []
    while (ev := conn.next_event()) is not NEED_DATA:
        out.append(ev)
    return out


def handshake(info: ClientInfoJSON | None = None) -> tuple[DerpConnection, DerpConnection]:
    s = DerpConnection(Role.SERVER, SERVER, now=100.0)
    c = DerpConnection(Role.CLIENT, CLIENT, now=100.0, client_info=info)
    c.receive_data(s.data_to_send())
    assert [type(e) for e in drain(c)] == [f.ServerKey]
    s.receive_data(c.data_to_send())
    (auth,) = drain(s)
    assert isinstance(auth, ClientAuthenticated)
    assert auth.key == c.public_key
    c.receive_data(s.accept())
    (done,) = drain(c)
    assert isinstance(done, Connected) and done.server_key == s.public_key and done.info == {"version": 2}
    return s, c


def test_handshake_then_frames_both_ways() -> None:
    s, c = handshake(ClientInfoJSON(mesh_key="ab" * 32))
    assert s.state is State.OPEN and c.state is State.OPEN
    s.receive_data(c.send(f.SendPacket(bytes(32), b"pkt")) + c.send(f.NotePreferred(True)))
    assert drain(s) == [f.SendPacket(bytes(32), b"pkt"), f.NotePreferred(True)]
    c.receive_data(s.send(f.RecvPacket(bytes(32), b"back")) + s.send(f.KeepAlive()))
    assert drain(c) == [f.RecvPacket(bytes(32), b"back"), f.KeepAlive()]
    assert s.next_timer() is None


def test_mesh_key_travels_in_client_info() -> None:
    s = DerpConnection(Role.SERVER, SERVER)
    c = DerpConnection(Role.CLIENT, CLIENT, client_info=ClientInfoJSON(mesh_key="cd" * 32, is_prober=True))
    c.receive_data(s.data_to_send())
    drain(c)
    s.receive_data(c.data_to_send())
    (auth,) = drain(s)
    assert isinstance(auth, ClientAuthenticated)
    assert auth.info.mesh_key == "cd" * 32 and auth.info.is_prober and auth.info.version == 2


def test_forged_client_info_is_refused() -> None:
    """A client claiming someone else's key cannot seal ClientInfo for it."""
    s = DerpConnection(Role.SERVER, SERVER)
    victim = bytes(PrivateKey.generate().public_key)
    attacker = PrivateKey.generate()
    box = Box(attacker, PrivateKey(SERVER).public_key)
    nonce = bytes(24)
    sealed = box.encrypt(b'{"version":2}', nonce).ciphertext
    s.receive_data(f.encode_client_info(victim, nonce, sealed))
    with pytest.raises(RemoteProtocolError, match="ClientInfo box does not open"):
        s.next_event()
    assert s.state is State.ERROR
    with pytest.raises(LocalProtocolError):
        s.receive_data(b"more")


def test_first_frame_must_be_client_info() -> None:
    s = DerpConnection(Role.SERVER, SERVER)
    s.receive_data(f.encode_send_packet(bytes(32), b"x"))
    with pytest.raises(RemoteProtocolError, match="expected ClientInfo, got frame type 0x04"):
        s.next_event()


def test_handshake_deadline() -> None:
    s = DerpConnection(Role.SERVER, SERVER, now=50.0)
    assert s.next_timer() == 60.0
    s.handle_timer(59.9)
    with pytest.raises(RemoteProtocolError, match="deadline"):
        s.handle_timer(60.0)


def test_frames_after_client_info_wait_for_accept() -> None:
    s = DerpConnection(Role.SERVER, SERVER)
    c = DerpConnection(Role.CLIENT, CLIENT)
    c.receive_data(s.data_to_send())
    drain(c)
    s.receive_data(c.data_to_send() + f.encode_note_preferred(True))
    assert [type(e) for e in drain(s)] == [ClientAuthenticated]
    s.accept()
    assert drain(s) == [f.NotePreferred(True)]


def test_send_before_open_is_misuse() -> None:
    c = DerpConnection(Role.CLIENT, CLIENT)
    with pytest.raises(LocalProtocolError, match="cannot send Ping in state await-server-key"):
        c.send(f.Ping(bytes(8)))


def test_registry_duplicates_peer_gone_and_announce() -> None:
    r: Registry[str, str] = Registry()
    a, b = b"a" * 32, b"b" * 32
    assert r.add(a, "a1") == [Announce(a, True)]
    assert r.add(b, "b1") == [Announce(b, True)]
    # The newest connection for a key is active; the older one hears about it.
    assert r.add(a, "a2") == [SendHealth("a1", DUPLICATE_PROBLEM)]
    assert r.active[a] == "a2"
    r.note_sent(b, a)
    # The active duplicate leaves: the older one is active again and healthy.
    assert r.remove(a, "a2") == [SendHealth("a1", "")]
    assert r.active[a] == "a1"
    assert r.remove(a, "a1") == [SendPeerGone(b, a), Announce(a, False)]
    assert a not in r.active
    assert r.remove(a, "a1") == []


def test_registry_forwarders() -> None:
    r: Registry[str, str] = Registry()
    k = b"k" * 32
    r.add_forwarder(k, "mesh1")
    assert r.remove_forwarder(k, "other") is False
    assert r.remove_forwarder(k, "mesh1") is True
    r.add_forwarder(k, "mesh1")
    assert r.remove_forwarders_of("mesh1") == [k]


MESH = "0123456789abcdef" * 4
BAD_KEY = "ClientInfo meshKey must be 64 hex digits (a 32-byte key), got "


def info(raw: str) -> ClientInfoJSON:
    return ClientInfoJSON.from_json(raw.encode())


def server_reading(raw: bytes) -> DerpConnection:
    """A server that has received a ClientInfo sealing ``raw`` (any bytes) from CLIENT."""
    s = DerpConnection(Role.SERVER, SERVER)
    nonce = bytes(24)
    sealed = Box(PrivateKey(CLIENT), PrivateKey(SERVER).public_key).encrypt(raw, nonce).ciphertext
    s.receive_data(f.encode_client_info(bytes(PrivateKey(CLIENT).public_key), nonce, sealed))
    return s


@pytest.mark.parametrize(
    "raw",
    [
        f'{{"Version": 2, "MeshKey": "{MESH}", "canAckPings": true, "isprober": true}}',
        f'{{"VERSION": 2, "MESHKEY": "{MESH}", "CANACKPINGS": true, "ISPROBER": true}}',
        # Go's foldName maps the Kelvin sign to K, the long s to S, dotless i and dotted I to I.
        f'{{"vers\u0131on": 2, "me\u017fh\u212aey": "{MESH}", "CanAc\u212aPings": true, "\u0130\u017fProber": true}}',
        # The last occurrence of a field wins, whatever its case.
        f'{{"version": 1, "Version": 2, "meshKey": "{"00" * 32}", "MeshKey": "{MESH}", "CanAckPings": true,'
        f' "IsProber": false, "isProber": true}}',
    ],
    ids=["camel", "upper", "go-fold", "last-wins"],
)
def test_sec_client_info_keys_match_as_go_encoding_json_does(raw: str) -> None:
    got = info(raw)
    assert (got.version, got.mesh_key, got.can_ack_pings, got.is_prober, got.extra) == (2, MESH, True, True, {})


def test_sec_client_info_null_leaves_a_field_unset_and_unknown_keys_are_kept() -> None:
    got = info('{"version": null, "CanAckPings": null, "Future": [1, {"a": 2}], "versionx": 3}')
    assert (got.version, got.can_ack_pings, got.extra) == (0, False, {"Future": [1, {"a": 2}], "versionx": 3})


@pytest.mark.parametrize(
    "raw,message",
    [
        (f'{{"meshKey": "{MESH[:-2]}"}}', BAD_KEY + "62 characters"),
        (f'{{"MeshKey": "{MESH}00"}}', BAD_KEY + "66 characters"),
        ('{"meshKey": ""}', BAD_KEY + "0 characters"),
        (f'{{"meshKey": "{"zz" * 32}"}}', BAD_KEY + "non-hex"),
        ('{"meshKey": 7}', "ClientInfo meshKey must be a string of 64 hex digits, got an integer"),
        ('{"meshKey": null}', "ClientInfo meshKey must be a string of 64 hex digits, got null"),
        # A wrong-length key is refused even when a later occurrence is right (Go fails the whole Unmarshal).
        (f'{{"meshKey": "ab", "meshKey": "{MESH}"}}', "got 2 characters"),
        ('{"version": "2"}', "ClientInfo version must be an integer, got a string"),
        ('{"Version": 2.0}', "ClientInfo version must be an integer, got a non-integer number"),
        ('{"version": true}', "ClientInfo version must be an integer, got a boolean"),
        ('{"version": 9223372036854775808}', "ClientInfo version must be an integer, got an integer out of range"),
        ('{"canackpings": "yes"}', "ClientInfo CanAckPings must be true or false, got a string"),
        ('{"IsProber": 1}', "ClientInfo IsProber must be true or false, got an integer"),
        ('{"version": NaN}', "ClientInfo is not JSON: NaN is not JSON"),
        ("[2]", "ClientInfo JSON is not an object"),
    ],
)
def test_sec_client_info_bad_values_are_refused_with_a_clear_error(raw: str, message: str) -> None:
    with pytest.raises(HandshakeError) as e:
        info(raw)
    assert message in str(e.value)


def test_sec_wrong_length_mesh_key_fails_the_handshake() -> None:
    s = server_reading(b'{"version": 2, "meshKey": "abcd"}')
    with pytest.raises(HandshakeError, match="meshKey must be 64 hex digits") as e:
        s.next_event()
    assert e.value.reason == "handshake_error" and s.state is State.ERROR


_FIELD_NAMES = ["version", "meshKey", "CanAckPings", "IsProber"]
_FOLDED = {n.upper() for n in _FIELD_NAMES}
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=70),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def recased(draw: st.DrawFn, name: str) -> str:
    return "".join(c.upper() if draw(st.booleans()) else c.lower() for c in name)


@given(st.lists(st.tuples(st.one_of(st.sampled_from(_FIELD_NAMES).flatmap(recased), st.text(max_size=12)), _JSON)))
def test_fuzz_client_info_json(pairs: list[tuple[str, object]]) -> None:
    raw = ("{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}").encode()
    try:
        got = ClientInfoJSON.from_json(raw)
    except HandshakeError:
        return
    # Accepted: each field holds the last non-null value given under any casing of its name.
    last = {_go_fold(k): v for k, v in pairs if _go_fold(k) in _FOLDED and v is not None}
    assert got.version == last.get("VERSION", 0)
    assert got.mesh_key == last.get("MESHKEY", "")
    assert got.can_ack_pings is last.get("CANACKPINGS", False)
    assert got.is_prober is last.get("ISPROBER", False)
    assert set(got.extra) == {k for k, _ in pairs if _go_fold(k) not in _FOLDED}


@given(st.binary(max_size=300))
def test_fuzz_client_info_bytes(raw: bytes) -> None:
    with contextlib.suppress(HandshakeError):
        ClientInfoJSON.from_json(raw)


@given(st.sampled_from(_FIELD_NAMES).flatmap(recased), st.booleans(), st.integers(-5, 5))
def test_fuzz_client_info_any_casing_of_a_field(key: str, flag: bool, version: int) -> None:
    value = {"VERSION": version, "MESHKEY": MESH}.get(key.upper(), flag)
    got = ClientInfoJSON.from_json(json.dumps({key: value}).encode())
    field = {"VERSION": "version", "MESHKEY": "mesh_key", "CANACKPINGS": "can_ack_pings", "ISPROBER": "is_prober"}
    assert getattr(got, field[key.upper()]) == value and got.extra == {}
