"""The wireguard-go engine: a supervised `wireguard-go -f IFACE` child configured over its UAPI socket.

wireguard-go keeps its socket at /var/run/wireguard/IFACE.sock, a path shared by every network namespace, so
each engine in one machine needs its own interface name. The child is started under `ip netns exec NS` when a
namespace is given (`ip netns exec` execs, so the PID we hold is wireguard-go's own).

If the child dies, it is restarted with exponential back-off (0.25 s doubling to 30 s, reset once a child has
lived 30 s) and the last config is re-applied; `on_restart` lets the owner re-apply what lived on the old
interface (addresses, routes, filters), since a new child makes a new interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO

from node.errors import LocalError
from node.wg import uapi
from node.wg.config import DeviceState, WgConfig, plan

log = logging.getLogger(__name__)

SOCK_DIR = Path("/var/run/wireguard")
BACKOFF_MIN = 0.25
BACKOFF_MAX = 30.0
HEALTHY_AFTER = 30.0
START_TIMEOUT = 10.0


class EngineError(LocalError):
    """The engine could not start, or the device refused a request."""


class GoEngine:
    name = "wireguard-go"

    def __init__(
        self,
        iface: str,
        *,
        netns: str | None = None,
        binary: str = "wireguard-go",
        sock_dir: Path = SOCK_DIR,
        log_path: Path | None = None,
        on_restart: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        if not iface or len(iface) > 15 or "/" in iface:
            raise ValueError(f"interface name {iface!r} must be 1-15 characters without '/'")
        self.iface = iface
        self.netns = netns
        self.binary = binary
        self.sock_path = sock_dir / f"{iface}.sock"
        self.log_path = log_path
        self.on_restart = on_restart
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        self._last: WgConfig | None = None
        self._lock = asyncio.Lock()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def stopping(self) -> bool:
        return self._stopping

    def argv(self) -> list[str]:
        cmd = [self.binary, "-f", self.iface]
        return cmd if self.netns is None else ["ip", "netns", "exec", self.netns, *cmd]

    async def start(self) -> None:
        self._stopping = False
        await self._spawn()
        self._supervisor = asyncio.create_task(self._supervise(), name=f"wireguard-go {self.iface}")

    async def _spawn(self) -> None:
        out: IO[bytes] | int = asyncio.subprocess.DEVNULL
        logf = None
        if self.log_path is not None:
            logf = open(self.log_path, "ab")  # noqa: SIM115 (handed to the child, closed below)
            out = logf
        env = dict(os.environ, WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD="1", LOG_LEVEL="error")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv(), stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                start_new_session=True,
            )
        except OSError as e:
            raise EngineError(f"cannot start {self.binary}: {e}") from None
        finally:
            if logf is not None:
                logf.close()
        proc = self._proc
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while True:
            if proc.returncode is not None:
                raise EngineError(f"{self.binary} -f {self.iface} exited with {proc.returncode} at start"
                                  + (f"; see {self.log_path}" if self.log_path else ""))
            if self.sock_path.exists():
                try:
                    await self._exchange(uapi.GET)
                    return
                except (OSError, EngineError):
                    pass
            if loop.time() > deadline:
                await self._kill()
                raise EngineError(
                    f"{self.binary} made no UAPI socket at {self.sock_path} in {START_TIMEOUT}s"
                )
            await asyncio.sleep(0.02)

    async def _supervise(self) -> None:
        backoff = BACKOFF_MIN
        loop = asyncio.get_running_loop()
        while not self._stopping:
            proc = self._proc
            assert proc is not None
            born = loop.time()
            rc = await proc.wait()
            if self.stopping():
                return
            if loop.time() - born > HEALTHY_AFTER:
                backoff = BACKOFF_MIN
            log.warning("wireguard-go for %s exited with %s; restarting in %.2fs", self.iface, rc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
            if self.stopping():
                return
            try:
                await self._spawn()
                self.restarts += 1
                if self._last is not None:
                    await self.set(self._last)
                if self.on_restart is not None:
                    await self.on_restart()
            except Exception:
                log.exception("restarting wireguard-go for %s failed", self.iface)
                if self._proc is not None and self._proc.returncode is None:
                    await self._kill()

    async def _exchange(self, request: bytes) -> bytes:
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.sock_path))
        except OSError as e:
            raise EngineError(f"cannot reach {self.sock_path}: {e}") from None
        try:
            writer.write(request)
            await writer.drain()
            buf = b""
            while not uapi.reply_complete(buf):
                chunk = await asyncio.wait_for(reader.read(65536), 5.0)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > uapi.MAX_REPLY:
                    raise EngineError(f"UAPI reply from {self.sock_path} over {uapi.MAX_REPLY} bytes")
            return buf
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def get(self) -> DeviceState:
        reply = await self._exchange(uapi.GET)
        try:
            return uapi.parse_get(reply)
        except uapi.UapiError as e:
            raise EngineError(f"{self.iface}: {e}") from None

    async def set(self, cfg: WgConfig) -> None:
        async with self._lock:
            self._last = cfg
            update = plan(cfg, await self.get())
            if update.empty:
                return
            try:
                uapi.check_set_reply(await self._exchange(uapi.render_set(update)))
            except uapi.UapiError as e:
                raise EngineError(f"{self.iface}: {e}") from None

    async def _kill(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 3.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def stop(self) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        await self._kill()
        with contextlib.suppress(FileNotFoundError):
            self.sock_path.unlink()
