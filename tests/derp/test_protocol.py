"""The sans-IO handshake and registry, with no sockets: time is passed in."""

from __future__ import annotations

import pytest
from nacl.public import Box, PrivateKey

from derp import frames as f
from derp.protocol import (
    NEED_DATA,
    ClientAuthenticated,
    ClientInfoJSON,
    Connected,
    DerpConnection,
    LocalProtocolError,
    RemoteProtocolError,
    Role,
    State,
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
