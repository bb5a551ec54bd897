"""Runs the server: the public HTTP app and the admin socket in one process, holding the data dir's lock."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

import uvicorn

from coord.app import create_app
from coord.config import Config
from coord.lock import ServerLock
from derp.embed import derp_http_protocol

log = logging.getLogger("shoal.server")


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
    public = QuietServer(
        uvicorn.Config(app.http, host=host, port=port, log_level="warning", lifespan="off", timeout_keep_alive=75,
                       **extra)
    )
    sock = config.data_path / "admin.sock"
    if sock.exists():
        sock.unlink()
    admin_srv = QuietServer(
        uvicorn.Config(app.admin_http, uds=str(sock), log_level="warning", lifespan="off")
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(public.serve()), asyncio.create_task(admin_srv.serve())]
    while not (public.started and admin_srv.started):
        if any(t.done() for t in tasks):
            break
        await asyncio.sleep(0.02)
    if sock.exists():
        os.chmod(sock, 0o600)
    log.info("shoal-server listening on %s (server URL %s, data %s)", config.listen, config.server_url,
             config.data_dir)
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    public.should_exit = admin_srv.should_exit = True
    await asyncio.gather(*tasks, return_exceptions=True)
    waiter.cancel()
    await app.close()
    if sock.exists():
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
