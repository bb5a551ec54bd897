"""Runs the server: the public HTTP app and the admin socket in one process, holding the data dir's lock."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Iterator
from typing import Any

import uvicorn

from coord import private
from coord.app import create_app
from coord.config import Config, parse_hostport
from coord.lock import ServerLock
from derp.embed import derp_http_protocol
from derp.expose import serve_metrics

log = logging.getLogger("shoal.server")
STREAM_USER_TIMEOUT = 6.0  # seconds


class QuietServer(uvicorn.Server):
    """Two of these share one process, so neither installs signal handlers: ours stop both."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def run(config: Config) -> None:
    app = await create_app(config)
    await app.start()
    host, port = config.listen_addr
    extra: dict[str, Any] = {}
    if app.relay is not None:
        # One port for both: DERP upgrades go to the relay, everything else to the app.
        extra["http"] = derp_http_protocol(app.relay)
    if config.tls_cert:
        extra["ssl_certfile"] = config.tls_cert
        extra["ssl_keyfile"] = config.tls_key
    # proxy_headers off: uvicorn would otherwise believe X-Forwarded-For from 127.0.0.1; the API reads it itself,
    # and only from the proxies the configuration names (trusted_proxies).
    public = QuietServer(
        uvicorn.Config(app.http, host=host, port=port, log_level="warning", lifespan="off", timeout_keep_alive=75,
                       proxy_headers=False, **extra)
    )
    sock = config.data_path / "admin.sock"
    # Bound by us, not uvicorn: uvicorn creates a Unix socket 0666 and leaves it so.
    admin_sock = private.bind_unix(sock)
    admin_srv = QuietServer(uvicorn.Config(app.admin_http, log_level="warning", lifespan="off"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Bound here to set TCP_USER_TIMEOUT, which accepted connections inherit: a map stream whose data goes
    # unacknowledged that long (a cut link: routers get keep-alives every second, coord/fanout.py) is ended by the
    # kernel, so the node goes offline in seconds, not after TCP's retransmissions (~15 min).
    public_sock = public.config.bind_socket()
    public_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(STREAM_USER_TIMEOUT * 1000))
    tasks = [asyncio.create_task(public.serve(sockets=[public_sock])),
             asyncio.create_task(admin_srv.serve(sockets=[admin_sock]))]
    while not (public.started and admin_srv.started):
        if any(t.done() for t in tasks):
            break
        await asyncio.sleep(0.02)
    metrics_srv = None
    if config.metrics_listen:
        mhost, mport = parse_hostport(config.metrics_listen, "metrics_listen")
        try:
            metrics_srv = await serve_metrics(app.metrics.registry, mhost, mport)
        except OSError as e:
            # The tailnet does not depend on it: serve without metrics, and say so (`shoal-server doctor` too).
            log.warning("metrics: cannot listen on %s (%s); serving without /metrics", config.metrics_listen,
                        e.strerror)
        else:
            log.info("metrics on http://%s/metrics", config.metrics_listen)
    log.info("shoal-server listening on %s (server URL %s, data %s)", config.listen, config.server_url,
             config.data_dir)
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    public.should_exit = admin_srv.should_exit = True
    await asyncio.gather(*tasks, return_exceptions=True)
    waiter.cancel()
    if metrics_srv is not None:
        metrics_srv.close()
    await app.close()
    admin_sock.close()
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()


def serve(config: Config) -> int:
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    lock = ServerLock(config.data_path)
    if not lock.try_acquire():
        sys.stderr.write(f"shoal-server: another server is running on {config.data_dir}\n")
        return 1
    try:
        asyncio.run(run(config))
    finally:
        lock.release()
    return 0
