"""The shape of derp/: one error root, close reasons carried by error classes, enums for states, no imports
hidden in functions, and metrics rendered by a pure function."""

from __future__ import annotations

import ast
import asyncio
import importlib
import inspect
import os
import pkgutil
from pathlib import Path

import pytest
from nacl.public import Box, PrivateKey

import derp
from derp import cli, client, frames, http, protocol, stun
from derp.conn import Conn, Mode, NotMesh
from derp.errors import CloseReason, ConfigError, DerpError, LocalError, RemoteError
from derp.mesh import MeshLink
from derp.metrics import DropReason, Gauges, Metrics, StunCounts, render
from derp.protocol import DerpConnection, Role, State
from derp.server import DerpServer

DERP = Path(derp.__file__).parent
SERVER = bytes(PrivateKey.generate())


def derp_modules() -> list[object]:
    return [importlib.import_module(f"derp.{m.name}") for m in pkgutil.iter_modules([str(DERP)])]


def test_shape_every_derp_exception_has_one_root() -> None:
    defined = {
        obj
        for mod in derp_modules()
        for _, obj in inspect.getmembers(mod, inspect.isclass)
        if issubclass(obj, BaseException) and obj.__module__.startswith("derp.")
    }
    assert len(defined) >= 14, sorted(c.__name__ for c in defined)
    assert all(issubclass(c, DerpError) for c in defined), [c for c in defined if not issubclass(c, DerpError)]
    # The split: misuse is local (and a ValueError, as before), bad peer input remote.
    for local in (LocalError, ConfigError, cli.CliError, frames.LocalFrameError):
        assert issubclass(local, ValueError) and not issubclass(local, RemoteError)
    for remote in (frames.RemoteFrameError, protocol.HandshakeError, NotMesh, http.HttpError, stun.StunError,
                   client.RelayRefused):
        assert issubclass(remote, RemoteError) and not issubclass(remote, LocalError)
    # Old names keep working.
    assert protocol.RemoteProtocolError is frames.RemoteFrameError
    assert protocol.LocalProtocolError is frames.LocalFrameError
    assert issubclass(stun.StunError, ValueError) and issubclass(http.HttpError, ValueError)
    assert issubclass(client.RelayRefused, ConnectionError)
    assert issubclass(frames.RemoteFrameError, frames.FrameError)


def test_shape_misuse_raises_local_errors() -> None:
    with pytest.raises(ConfigError, match="relay private key must be 32 bytes"):
        DerpServer(b"short")
    with pytest.raises(ConfigError, match="mesh key must be 32 bytes"):
        DerpServer(SERVER, mesh_key=b"short")
    with pytest.raises(ConfigError, match="relay URL must be"):
        client.DerpClient("ftp://x/derp", SERVER)
    with pytest.raises(ConfigError, match="mesh key must be 32 bytes"):
        client.DerpClient("http://x/derp", SERVER, mesh_key=b"short")
    with pytest.raises(LocalError, match="transaction ID must be 12 bytes"):
        stun.build_request(b"short")


def sealed_client_info(sender: PrivateKey, claimed: bytes, body: bytes) -> bytes:
    box = Box(sender, PrivateKey(SERVER).public_key)
    return frames.encode_client_info(claimed, bytes(24), box.encrypt(body, bytes(24)).ciphertext)


@pytest.mark.parametrize(
    "data,cls,reason",
    [
        # Someone else's key: the box does not open.
        (
            sealed_client_info(PrivateKey.generate(), bytes(PrivateKey.generate().public_key), b"{}"),
            protocol.ForgedClientInfo,
            CloseReason.FORGED_CLIENT_INFO,
        ),
        # Frame-level errors before the connection is open are handshake errors, with the frame error's text.
        (frames.header(frames.FrameType.SEND_PACKET, 2 << 20), protocol.HandshakeError, CloseReason.HANDSHAKE_ERROR),
        (frames.encode_send_packet(bytes(32), b"x"), protocol.HandshakeError, CloseReason.HANDSHAKE_ERROR),
    ],
    ids=["forged", "oversized", "wrong-frame"],
)
def test_shape_close_reasons_come_from_error_classes(data: bytes, cls: type, reason: CloseReason) -> None:
    s = DerpConnection(Role.SERVER, SERVER)
    with pytest.raises(RemoteError) as e:
        s.receive_data(data)
        s.next_event()
    assert type(e.value) is cls and e.value.reason is reason and s.state is State.ERROR


def test_shape_remote_errors_name_their_close_reason() -> None:
    assert frames.RemoteFrameError.reason is CloseReason.PROTOCOL_ERROR
    assert protocol.HandshakeTimeout.reason is CloseReason.HANDSHAKE_TIMEOUT
    assert NotMesh.reason is CloseReason.NOT_MESH
    assert http.HttpError.reason is CloseReason.BAD_HTTP
    s = DerpConnection(Role.SERVER, SERVER, now=0.0)
    with pytest.raises(protocol.HandshakeTimeout):
        s.handle_timer(60.0)
    # After the handshake, a bad frame is a protocol error, not a handshake error.
    c = DerpConnection(Role.CLIENT, bytes(PrivateKey.generate()))
    s = DerpConnection(Role.SERVER, SERVER)
    c.receive_data(s.data_to_send())
    while c.next_event() is not protocol.NEED_DATA:
        pass
    s.receive_data(c.data_to_send())
    s.next_event()
    s.accept()
    s.receive_data(frames.frame(frames.FrameType.NOTE_PREFERRED, b"\x01\x02"))
    with pytest.raises(frames.RemoteFrameError) as e:
        s.next_event()
    assert not isinstance(e.value, protocol.HandshakeError) and e.value.reason is CloseReason.PROTOCOL_ERROR


def test_shape_no_function_local_imports() -> None:
    hidden = []
    for path in sorted(DERP.glob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                hidden += [
                    f"{path.name}:{n.lineno}" for n in ast.walk(fn) if isinstance(n, ast.Import | ast.ImportFrom)
                ]
    assert hidden == []


def test_shape_metrics_render_is_pure() -> None:
    m = Metrics()
    m.drop(DropReason.QUEUE_FULL, 3)
    m.close(CloseReason.NOT_MESH)
    m.packets_forwarded = 7
    text = render(m, Gauges(2, 1, 2, 100, 60, 1, 5, StunCounts(9, 4)))
    lines = text.splitlines()
    for want in (
        "derp_clients 2.0",
        "derp_clients_home 1.0",
        "derp_unique_keys 2.0",
        "derp_packets_forwarded_total 7.0",
        'derp_packets_dropped_total{reason="queue_full"} 3.0',
        'derp_closes_total{reason="not_mesh"} 1.0',
        "derp_queue_bytes 100.0",
        "derp_queue_bytes_max 60.0",
        "derp_mesh_peers 1.0",
        "derp_mesh_forwarded_keys 5.0",
        "derp_stun_requests_total 9.0",
        "derp_stun_bad_total 4.0",
    ):
        assert want in lines
    # Every reason has a series from the start; without a STUN server there are no STUN lines.
    for r in DropReason:
        assert any(line.startswith(f'derp_packets_dropped_total{{reason="{r.value}"}} ') for line in lines)
    for c in CloseReason:
        assert any(line.startswith(f'derp_closes_total{{reason="{c.value}"}} ') for line in lines)
    assert "stun" not in render(Metrics(), Gauges(0, 0, 0, 0, 0, 0, 0))
    # Counters keep answering to the reason's text, as before the enums.
    assert m.drops["queue_full"] == 3 and m.closes["not_mesh"] == 1


@pytest.mark.anyio
async def test_shape_connection_modes_are_an_enum() -> None:
    mesh_key = os.urandom(32)
    server = DerpServer(SERVER, mesh_key=mesh_key)
    port = (await server.serve("127.0.0.1", 0)).sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}/derp"
    server.mesh_with = ["http://127.0.0.1:9/derp"]
    c = client.DerpClient(url, bytes(PrivateKey.generate()))
    try:
        await server.start()
        assert [type(link) for link in server.mesh_links] == [MeshLink]
        c.start()
        await c.wait_connected(5)
        (conn,) = server.conns
        assert isinstance(conn, Conn) and conn.mode is Mode.OPEN and conn.mode == "open"
        await c.close()
        for _ in range(100):
            if conn.mode is Mode.CLOSED:
                break
            await asyncio.sleep(0.02)
        assert conn.mode is Mode.CLOSED and not server.conns
    finally:
        await c.close()
        await server.close()
    assert [m.value for m in Mode] == ["http", "handshake", "open", "closed"]
