"""A webhook receiver for the tests: a real HTTP server on loopback (a thread), one endpoint per path.

It checks what a Tailscale webhook receiver checks, written here from the documented format rather than with
coord/webhooks.py: ``Tailscale-Webhook-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``, with
``t`` at most 5 minutes old; a request that fails is answered 400 and recorded as refused.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Hit:
    path: str
    t: int
    events: list[dict[str, Any]]
    signature: str
    at: float
    code: int = 200  # what the receiver answered
    wall: float = 0.0  # time.time() at arrival

    @property
    def seqs(self) -> list[int]:
        return [int(e["data"]["seq"]) for e in self.events]


@dataclass
class Path:
    secret: str = ""
    fail: int = 0  # answer 500 to this many requests first
    refuse_seq: int | None = None  # answer 500 to any request holding this seq
    delay: float = 0.0  # seconds before answering
    # Hold every request after the first ``hold_after`` (recorded on arrival) until ``release`` is set: the sender
    # is then mid-delivery for as long as the test likes.
    hold_after: int | None = None
    release: threading.Event = field(default_factory=threading.Event)


@dataclass
class Receiver:
    paths: dict[str, Path] = field(default_factory=dict)
    hits: list[Hit] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                code = receiver.handle(self.path, self.headers.get("Tailscale-Webhook-Signature", ""), body)
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def check(self, secret: str, header: str, body: bytes, now: float) -> int | None:
        """``t`` of a valid signature, or None."""
        fields: dict[str, list[str]] = {}
        for part in header.split(","):
            k, _, v = part.partition("=")
            fields.setdefault(k.strip(), []).append(v.strip())
        try:
            (t_text,) = fields["t"]
            t = int(t_text)
        except (KeyError, ValueError):
            return None
        if abs(now - t) > 300:
            return None
        want = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
        return t if any(hmac.compare_digest(want, v) for v in fields.get("v1", [])) else None

    def handle(self, path: str, header: str, body: bytes) -> int:
        p = self.paths.get(path)
        if p is None:
            return 404
        t = self.check(p.secret, header, body, time.time())
        if t is None:
            with self.lock:
                self.refused.append(path)
            return 400
        hit = Hit(path, t, json.loads(body), header, time.monotonic(), wall=time.time())
        with self.lock:
            fail = p.fail > 0 or (p.refuse_seq is not None and p.refuse_seq in hit.seqs)
            p.fail -= 1 if p.fail > 0 else 0
            hit.code = 500 if fail else 200
            self.hits.append(hit)
            hold = p.hold_after is not None and len([h for h in self.hits if h.path == path]) > p.hold_after
        if hold:
            p.release.wait(30)
        if p.delay:
            time.sleep(p.delay)
        return hit.code

    def of(self, path: str) -> list[Hit]:
        with self.lock:
            return [h for h in self.hits if h.path == path]
