"""`shoald`: the node agent daemon (root). Runs one Agent and its local API on a Unix socket.

    shoald [--state-dir /var/lib/shoal] [--socket /run/shoal/shoald.sock] [--iface shoal0] [--port 41641]
           [--engine auto|wireguard-go|kernel] [--log-level info] [--no-dns] [--resolv-conf /etc/resolv.conf]

The socket is bound and made 0600 before it listens, so no one but root can ever connect. One daemon per
state dir (a lock file) and per socket. SIGTERM/SIGINT take the tunnel down and exit; the node stays
registered and a restart brings the tunnel back, from the saved netmap if the server is unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, NoReturn

import uvicorn
from prometheus_client import CollectorRegistry

from node.agent import Agent, AgentConfig
from node.api import create_app
from node.errors import LocalError
from node.keys import StateFileError

log = logging.getLogger("shoald")


class DaemonError(LocalError):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"shoald: {message} (see --help)\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="shoald", description="Shoal node agent.")
    p.add_argument("--state-dir", default="/var/lib/shoal", help="keys, prefs and the last netmap")
    p.add_argument("--socket", default="/run/shoal/shoald.sock", help="local API socket (root only)")
    p.add_argument("--iface", default="shoal0", help="WireGuard interface name")
    p.add_argument("--port", type=int, default=41641, help="WireGuard UDP port")
    p.add_argument("--engine", choices=["auto", "wireguard-go", "kernel"], default="auto")
    p.add_argument("--no-dns", action="store_true", help="no MagicDNS resolver on 100.100.100.100")
    p.add_argument("--resolv-conf", default="/etc/resolv.conf",
                   help="the file MagicDNS points at quad-100 ('' : never touch the OS)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    return p


class _Server(uvicorn.Server):
    """Our own signal handlers stop the agent first; uvicorn must not install its own."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def lock_state_dir(state_dir: Path) -> IO[str]:
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    f = open(state_dir / "shoald.lock", "w")  # noqa: SIM115 (held for the daemon's life)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise DaemonError(f"another shoald is running on state dir {state_dir}") from None
    return f


def bind_socket(path: Path) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # a leftover of a daemon that died
        else:
            raise DaemonError(f"another shoald is listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.setblocking(False)
    return sock


async def run(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise DaemonError(f"--port {args.port} is not a UDP port")
    # Handlers first: once the socket exists a supervisor may signal us, and that must be a clean stop.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    state_dir = Path(args.state_dir)
    lock = lock_state_dir(state_dir)
    sock_path = Path(args.socket)
    sock = bind_socket(sock_path)
    agent = Agent(AgentConfig(state_dir=state_dir, iface=args.iface, port=args.port, engine=args.engine,
                              dns=not args.no_dns, resolv_conf=Path(args.resolv_conf) if args.resolv_conf else None))
    try:
        await agent.start()
        server = _Server(uvicorn.Config(create_app(agent, CollectorRegistry()), log_level="warning", lifespan="off"))
        task = asyncio.create_task(server.serve(sockets=[sock]))
        log.info("shoald: state %s, socket %s, interface %s, port %d, engine %s, %s", state_dir, sock_path,
                 args.iface, args.port, agent.engine.name if agent.engine else "-", agent.backend)
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait([waiter, task], return_when=asyncio.FIRST_COMPLETED)
        server.should_exit = True
        waiter.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 5)
    finally:
        await agent.stop()
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()
        lock.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # one line per control request would drown what matters
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return asyncio.run(run(args))
    except (StateFileError, DaemonError) as e:
        sys.stderr.write(f"shoald: {e}\n")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
