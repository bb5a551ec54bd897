"""A loopback HTTP listener that serves one ``CollectorRegistry`` as ``GET /metrics`` (asyncio, no thread).

Used by ``shoal-derp`` and ``shoal-server`` (``--metrics-listen``). prometheus_client's own ``start_http_server``
scrapes from a thread; ours scrapes on the event loop, so collectors read the relay's and the server's state
without locks. Wire format: one HTTP/1.1 request per connection (head up to 8 KiB, 5 s to send it); ``GET
/metrics`` answers 200 with the text exposition (text format 0.0.4), any other path 404, another method
405; the connection closes after each response.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from prometheus_client import CollectorRegistry, generate_latest

log = logging.getLogger("shoal.metrics")
MAX_HEAD = 8 << 10
HEAD_TIMEOUT = 5.0
# generate_latest writes the 0.0.4 text format; newer prometheus_client releases label it "version=1.0.0", which
# Prometheus 2.x does not know. Say what the body is.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _response(status: str, ctype: str, body: bytes) -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    return head.encode() + body


def respond(registry: CollectorRegistry, head: bytes) -> bytes:
    """The response to one request head."""
    line = head.split(b"\r\n", 1)[0].split()
    if len(line) != 3 or not line[2].startswith(b"HTTP/"):
        return _response("400 Bad Request", "text/plain", b"bad request\n")
    method, target = line[0], line[1].split(b"?", 1)[0]
    if target != b"/metrics":
        return _response("404 Not Found", "text/plain", b"only /metrics here\n")
    if method not in (b"GET", b"HEAD"):
        return _response("405 Method Not Allowed", "text/plain", b"GET only\n")
    body = generate_latest(registry)
    out = _response("200 OK", CONTENT_TYPE, body)
    return out[: len(out) - len(body)] if method == b"HEAD" else out


async def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> asyncio.Server:
    """Listen on ``host:port`` (port 0: any) and answer scrapes of ``registry``."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
            w.write(respond(registry, head))
            await w.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        except Exception:
            log.exception("metrics scrape failed")
            with contextlib.suppress(ConnectionError):
                w.write(_response("500 Internal Server Error", "text/plain", b"scrape failed\n"))
        finally:
            w.close()
            with contextlib.suppress(ConnectionError):
                await w.wait_closed()

    return await asyncio.start_server(handle, host, port, limit=MAX_HEAD)
