"""Serve the relay on another HTTP server's port (uvicorn): the DERP upgrade is peeled off before the ASGI app.

    relay = DerpServer(private_key, admit=my_admit)
    config = uvicorn.Config(app, host=..., port=..., http=derp_http_protocol(relay))
    await relay.start()                       # mesh links, if any
    await uvicorn.Server(config).serve()

The returned protocol class looks at the first request head of each connection. ``GET /derp`` with
``Upgrade: DERP`` is handed to the relay (101, then DERP frames on the same socket); ``/derp`` without it,
``/derp/probe``, ``/derp/latency-check`` and ``/generate_204`` are answered here. Anything else goes, bytes
untouched, to uvicorn's own HTTP protocol (h11 or httptools) and from there to the ASGI app. Only the first
request of a connection is examined: later keep-alive requests go straight to the app.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from uvicorn.protocols.http.auto import AutoHTTPProtocol

from derp import http
from derp.server import DerpServer

# Enough bytes to tell a relay request ("GET /derp", "HEAD /derp/probe", "GET /generate_204") from anything else.
_PREFIXES = (b"GET /derp", b"HEAD /derp", b"GET /generate_204", b"HEAD /generate_204")


def _could_be_relay(buf: bytes) -> bool:
    return any(p.startswith(buf[: len(p)]) for p in _PREFIXES)


def derp_http_protocol(relay: DerpServer, inner: type[asyncio.Protocol] | None = None) -> type[asyncio.Protocol]:
    """A uvicorn ``http=`` protocol class that serves ``relay`` beside the ASGI app."""
    inner_cls: type[asyncio.Protocol] = AutoHTTPProtocol if inner is None else inner

    class DerpUpgradeProtocol(asyncio.Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._args, self._kwargs = args, kwargs
            self._buf = b""
            self._transport: asyncio.Transport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            # Not isinstance(): uvloop's transports do not subclass asyncio.Transport.
            self._transport = cast(asyncio.Transport, transport)

        def data_received(self, data: bytes) -> None:
            self._buf += data
            t = self._transport
            assert t is not None
            if not _could_be_relay(self._buf[:20]):
                self._delegate()
                return
            try:
                end = http.head_end(self._buf)
                if end < 0:
                    return
                req = http.parse_head(self._buf[:end])
            except http.HttpError:
                self._delegate()  # the app's HTTP parser will answer 400
                return
            if not http.is_relay_path(req.path):
                self._delegate()
                return
            if req.path == "/derp" and req.wants_derp and req.method == "GET":
                relay.upgrade(t, self._buf[end:])
                return
            t.write(http.simple_response(req))
            t.close()

        def _delegate(self) -> None:
            t = self._transport
            assert t is not None
            proto = inner_cls(*self._args, **self._kwargs)
            t.set_protocol(proto)
            proto.connection_made(t)
            data, self._buf = self._buf, b""
            proto.data_received(data)

        def eof_received(self) -> bool | None:
            return None

        def connection_lost(self, exc: Exception | None) -> None:
            self._buf = b""

    DerpUpgradeProtocol.__name__ = f"DerpUpgrade{inner_cls.__name__}"
    return DerpUpgradeProtocol
