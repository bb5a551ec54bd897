"""Mesh links: this relay as a watching client of each other relay of its region.

Each link is a ``DerpClient`` presenting the region's mesh key with WatchConns set. The other relay tells it who
is connected there (PeerPresent / PeerGone); the registry records the link as the forwarder for those keys, and
the hot path hands it runs for them (``forward``), re-framed as ForwardPacket. Packets travel one hop only. When a
link drops, every key it forwarded that is not connected here either is gone: whoever sent to it learns PeerGone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from derp import frames
from derp.client import ClientEvent, Connected, DerpClient, Disconnected
from derp.frames import FrameType
from derp.metrics import DropReason

if TYPE_CHECKING:
    from derp.server import DerpServer

_unpack_header = frames.HEADER.unpack_from
_MESH_DOWN = DropReason.MESH_DOWN  # bound once: Enum member lookups are slow on 3.11


class MeshLink:
    """This relay as a watching client of one other relay of the region."""

    def __init__(self, server: DerpServer, url: str) -> None:
        self.server = server
        self.url = url
        self.connected = False
        self.client = DerpClient(
            url,
            server.private_key,
            mesh_key=bytes.fromhex(server.mesh_key_hex),
            watch_conns=True,
            on_event=self._on_event,
            ssl=server.mesh_ssl,
            skip_server_key=server.public_key,
        )

    def start(self) -> None:
        self.client.start()

    async def stop(self) -> None:
        await self.client.close()

    def forward(self, src: bytes, dst: bytes, data: bytes | memoryview, n: int) -> None:
        # The run was rewritten in place to RecvPacket(src, packet) frames; re-frame each as ForwardPacket.
        if not self.connected:
            self.server.metrics.drop(_MESH_DOWN, n)
            return
        out: list[bytes] = []
        pos = 0
        run = memoryview(data)
        total = len(run)
        while pos < total:
            _, length = _unpack_header(run, pos)
            pkt = run[pos + 37 : pos + 5 + length]
            out.append(frames.header(FrameType.FORWARD_PACKET, 64 + len(pkt)) + src + dst + pkt.tobytes())
            pos += 5 + length
        if self.client.send_raw(b"".join(out)):
            self.server.metrics.packets_forwarded += n
        else:
            self.server.metrics.drop(_MESH_DOWN, n)

    def _on_event(self, ev: ClientEvent) -> None:
        reg = self.server.registry
        if isinstance(ev, Connected):
            self.connected = True
        elif isinstance(ev, Disconnected):
            self.connected = False
            for key in reg.remove_forwarders_of(self):
                if key not in reg.active:
                    self.server.remote_gone(key)
        elif isinstance(ev, frames.PeerPresent):
            if ev.key != self.server.public_key:
                reg.add_forwarder(ev.key, self)
        elif isinstance(ev, frames.PeerGone) and reg.remove_forwarder(ev.key, self):
            self.server.remote_gone(ev.key)
