"""``shoal-derp``: run a standalone DERP relay and STUN server."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import httpx
from nacl.public import PrivateKey
from prometheus_client import CollectorRegistry

from derp.errors import ConfigError
from derp.expose import serve_metrics
from derp.metrics import RelayCollector
from derp.server import DerpServer
from derp.stunserver import start_stun_server

log = logging.getLogger("derp.cli")


class CliError(ConfigError):
    """A bad flag or file: printed as ``shoal-derp: <message>``, exit status 2."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="shoal-derp",
        description="A DERP relay (Tailscale's DERP v2 protocol) and STUN server for a Shoal tailnet. "
        "Clients reach it at http(s)://HOST:PORT/derp.",
    )
    p.add_argument("--addr", default=":8080", metavar="[HOST]:PORT",
                   help="TCP address for HTTP(S) and the DERP upgrade (default :8080; ':443' with TLS)")
    p.add_argument("--stun-port", type=int, default=3478, metavar="PORT",
                   help="UDP port for STUN binding requests (default 3478; 0 picks a free port)")
    p.add_argument("--no-stun", action="store_true", help="do not run the STUN server")
    p.add_argument("--metrics-listen", default="127.0.0.1:9471", metavar="HOST:PORT",
                   help="Prometheus /metrics listener (default 127.0.0.1:9471; '' to disable)")
    p.add_argument("--stun-addr", default="::", metavar="HOST",
                   help="UDP address for STUN (default '::', all IPv4 and IPv6 addresses)")
    p.add_argument("--certfile", type=Path, help="PEM certificate chain: serve HTTPS instead of plain HTTP")
    p.add_argument("--keyfile", type=Path, help="PEM private key for --certfile")
    p.add_argument("--key-file", type=Path, default=Path("derp.key"), metavar="FILE",
                   help="the relay's private key, 64 hex characters; created with mode 0600 if missing "
                   "(default ./derp.key)")
    p.add_argument("--verify-client-url", metavar="URL",
                   help="admit a client only if POSTing {\"NodePublic\": \"nodekey:<hex>\", \"Source\": IP} "
                   "here returns {\"Allow\": true}; fails closed after 5 s")
    p.add_argument("--mesh-with", default="", metavar="URL,URL",
                   help="other relays of this region to mesh with, as http(s)://host:port/derp URLs "
                   "(this relay's own URL may be listed; it is skipped)")
    p.add_argument("--mesh-key-file", type=Path, metavar="FILE",
                   help="file with the region's shared mesh key, 64 hex characters; required with --mesh-with "
                   "and for accepting mesh peers")
    p.add_argument("--mesh-insecure", action="store_true",
                   help="do not verify TLS certificates of https:// mesh peers (labs only)")
    p.add_argument("--queue-bytes", type=int, default=64 << 10, metavar="N",
                   help="per-client queue past the socket buffer; the oldest packets drop beyond it (default 65536)")
    p.add_argument("--loop", default="asyncio", choices=["auto", "asyncio", "uvloop"],
                   help="event loop (default asyncio): uvloop is optional (pip install 'shoal[fast]'); auto uses "
                   "it when installed. Measured on 2 cores it moved about as much but with far worse p99 latency")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="logging verbosity (default info)")
    p.add_argument("--print-public-key", action="store_true",
                   help="print the relay's public key (hex) and exit, creating the key file if needed")
    return p.parse_args(argv)


def split_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise CliError(f"--addr {addr!r}: want [HOST]:PORT")
    host = host.strip("[]")
    return host or "0.0.0.0", int(port)


def load_or_create_key(path: Path) -> bytes:
    """Read a 32-byte key stored as hex; create one with mode 0600 if the file does not exist."""
    if not path.exists():
        key = bytes(PrivateKey.generate())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key.hex() + "\n")
        log.info("created relay key %s", path)
        return key
    return read_hex_key(path, "key file")


def read_hex_key(path: Path, what: str) -> bytes:
    try:
        text = path.read_text().strip()
    except OSError as e:
        raise CliError(f"cannot read {what} {path}: {e.strerror}") from None
    text = text.removeprefix("privkey:")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise CliError(f"{what} {path} must hold 64 hex characters")
    return key


def tls_context(certfile: Path | None, keyfile: Path | None) -> ssl.SSLContext | None:
    if certfile is None and keyfile is None:
        return None
    if certfile is None or keyfile is None:
        raise CliError("--certfile and --keyfile go together")
    for path in (certfile, keyfile):
        if not os.access(path, os.R_OK):
            raise CliError(f"cannot read {path}: {'no such file' if not path.exists() else 'permission denied'}")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError) as e:
        raise CliError(f"cannot load certificate {certfile} / key {keyfile}: {e}") from None
    return ctx


def url_admitter(url: str, timeout: float = 5.0) -> Callable[[bytes, str], Awaitable[bool]]:
    """Admission by POSTing to ``url`` (Tailscale's --verify-client-url contract)."""

    async def admit(key: bytes, source: str) -> bool:
        async with httpx.AsyncClient(timeout=timeout) as client:
            r = await client.post(url, json={"NodePublic": "nodekey:" + key.hex(), "Source": source})
            if r.status_code != 200:
                return False
            body = r.json()
            return isinstance(body, dict) and body.get("Allow") is True

    return admit


async def run(args: argparse.Namespace) -> None:
    host, port = split_addr(args.addr)
    ctx = tls_context(args.certfile, args.keyfile)
    key = load_or_create_key(args.key_file)
    mesh_key = read_hex_key(args.mesh_key_file, "mesh key file") if args.mesh_key_file else None
    mesh_with = [u.strip() for u in args.mesh_with.split(",") if u.strip()]
    if mesh_with and mesh_key is None:
        raise CliError("--mesh-with needs --mesh-key-file")
    for u in mesh_with:
        if not u.startswith(("http://", "https://")):
            raise CliError(f"--mesh-with {u!r}: want http(s)://host:port/derp")
    mesh_ssl = None
    if args.mesh_insecure:
        mesh_ssl = ssl.create_default_context()
        mesh_ssl.check_hostname = False
        mesh_ssl.verify_mode = ssl.CERT_NONE
    relay = DerpServer(
        key,
        admit=url_admitter(args.verify_client_url) if args.verify_client_url else None,
        mesh_key=mesh_key,
        mesh_with=mesh_with,
        mesh_ssl=mesh_ssl,
        queue_bytes=args.queue_bytes,
    )
    try:
        srv = await relay.serve(host, port, ssl=ctx)
    except OSError as e:
        raise CliError(f"cannot listen on {args.addr}: {e.strerror}") from None
    bound = srv.sockets[0].getsockname()
    log.info("relay %s listening on %s://%s:%d/derp", relay.public_key.hex(), "https" if ctx else "http",
             bound[0], bound[1])
    stun = None
    if not args.no_stun:
        try:
            stun = await start_stun_server(args.stun_addr, args.stun_port)
        except OSError as e:
            raise CliError(f"cannot listen for STUN on UDP {args.stun_addr}:{args.stun_port}: {e.strerror}") from None
        relay.stun = stun
        log.info("STUN on UDP %s:%d", stun.host, stun.port)
    # The relay's metrics registry: built here, in the composition root, never the library's global one.
    registry = CollectorRegistry()
    registry.register(RelayCollector(relay.snapshot))
    metrics_srv = None
    if args.metrics_listen:
        mhost, _, mport = args.metrics_listen.rpartition(":")
        if not mport.isdigit():
            raise CliError(f"--metrics-listen {args.metrics_listen!r}: want HOST:PORT")
        try:
            metrics_srv = await serve_metrics(registry, mhost.strip("[]") or "127.0.0.1", int(mport))
        except OSError as e:
            raise CliError(f"cannot listen for metrics on {args.metrics_listen}: {e.strerror}") from None
        log.info("metrics on http://%s/metrics", args.metrics_listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    if metrics_srv is not None:
        metrics_srv.close()
    if stun is not None:
        stun.close()
    await relay.close()


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop for ``--loop``: None means asyncio's own."""
    if choice == "asyncio":
        return None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if choice == "uvloop":
            raise CliError("--loop uvloop: uvloop is not installed (pip install 'shoal[fast]')") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.print_public_key:
            print(bytes(PrivateKey(load_or_create_key(args.key_file)).public_key).hex())
            return 0
        factory = loop_factory(args.loop)
        log.info("event loop: %s", "uvloop" if factory is not None else "asyncio")
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(run(args))
    except CliError as e:
        print(f"shoal-derp: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
