"""The relay's tiny HTTP/1.1 front (sans-IO): request-head parsing and the fixed responses.

A relay connection starts as HTTP. ``GET /derp`` with ``Upgrade: DERP`` (and ``Connection: Upgrade``) gets::

    HTTP/1.1 101 Switching Protocols
    Upgrade: DERP
    Connection: Upgrade
    Derp-Version: 2
    Derp-Public-Key: <64 hex>

after which the socket carries DERP frames (derp.frames). Without the Upgrade header ``/derp`` gets 426. Other
paths: ``/derp/probe`` and ``/derp/latency-check`` (empty 200, ``Access-Control-Allow-Origin: *``),
``/generate_204`` (204, echoing a valid ``X-Tailscale-Challenge`` as ``X-Tailscale-Response: response <c>``),
``/health`` and ``/metrics`` (served by the glue). Each non-upgrade response closes the connection.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from derp.errors import CloseReason, RemoteError

MAX_HEAD = 8192
_CHALLENGE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class HttpError(RemoteError, ValueError):
    """A request head we refuse (answered 400)."""

    reason = CloseReason.BAD_HTTP


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "

    def header(self, name: str) -> str:
        return self.headers.get(name.lower(), "")

    @property
    def wants_derp(self) -> bool:
        return self.header("upgrade").strip().lower() == "derp"


def head_end(buf: bytes | bytearray) -> int:
    """Index just past the blank line ending the request head, -1 if not there yet, HttpError if too long."""
    i = buf.find(b"\r\n\r\n", 0, MAX_HEAD)
    if i < 0:
        if len(buf) >= MAX_HEAD:
            raise HttpError(f"request head is longer than {MAX_HEAD} bytes")
        return -1
    return i + 4


def parse_head(head: bytes) -> Request:
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes anything
        raise HttpError("undecodable request head") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not _TOKEN.fullmatch(parts[0].encode("latin-1")):
        raise HttpError(f"bad request line {lines[0][:80]!r}")
    method, target = parts[0], parts[1]
    if not target.startswith("/"):
        raise HttpError("request target must be a path")
    path, _, query = target.partition("?")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or not _TOKEN.fullmatch(name.encode("latin-1")):
            raise HttpError(f"bad header line {line[:80]!r}")
        key = name.lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return Request(method, path, query, headers)


def response(status: int, reason: str, headers: list[tuple[str, str]] | None = None, body: bytes = b"") -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}"]
    for name, value in headers or []:
        lines.append(f"{name}: {value}")
    if status not in (101, 204, 304):
        lines.append(f"Content-Length: {len(body)}")
    if status != 101:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def upgrade_response(server_public_key: bytes) -> bytes:
    return response(
        101,
        "Switching Protocols",
        [
            ("Upgrade", "DERP"),
            ("Connection", "Upgrade"),
            ("Derp-Version", "2"),
            ("Derp-Public-Key", server_public_key.hex()),
        ],
    )


def is_relay_path(path: str) -> bool:
    """Paths the relay answers itself when it shares a port with another HTTP app."""
    return path in ("/derp", "/derp/probe", "/derp/latency-check", "/generate_204")


def simple_response(req: Request, extra: dict[str, tuple[str, bytes]] | None = None) -> bytes:
    """The response for a non-upgrade request. ``extra`` maps more paths to (content type, body)."""
    head_only = req.method == "HEAD"
    if req.method not in ("GET", "HEAD"):
        return response(405, "Method Not Allowed", [("Allow", "GET, HEAD")])
    if req.path == "/derp":
        return response(
            426, "Upgrade Required", [("Upgrade", "DERP"), ("Content-Type", "text/plain")],
            b"" if head_only else b"DERP requires connection upgrade\n",
        )
    if req.path in ("/derp/probe", "/derp/latency-check"):
        return response(200, "OK", [("Access-Control-Allow-Origin", "*")])
    if req.path == "/generate_204":
        hdrs = [("Cache-Control", "no-cache, no-store, must-revalidate")]
        challenge = req.header("x-tailscale-challenge")
        if challenge and _CHALLENGE.fullmatch(challenge):
            hdrs.append(("X-Tailscale-Response", f"response {challenge}"))
        return response(204, "No Content", hdrs)
    if extra and req.path in extra:
        ctype, body = extra[req.path]
        return response(200, "OK", [("Content-Type", ctype)], b"" if head_only else body)
    return response(404, "Not Found", [("Content-Type", "text/plain")], b"" if head_only else b"not found\n")
