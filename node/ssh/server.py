"""The SSH server of `shoal up --ssh` (asyncssh), for connections to this node's tailnet addresses on port 22.

nft redirects tailnet port 22 to `port` (node/render/nft.py, `ssh_port`), so a host sshd on 0.0.0.0:22 is left
alone; the listener reads the original destination back with SO_ORIGINAL_DST and decide.py says who may log in
as whom. No keys or passwords: an allowed connection needs no authentication (`none`), a refused one is offered
only public keys and none is ever accepted ("Permission denied"), after a banner saying why.

Sessions run as the local user through subprocess `user=`, `group=`, `extra_groups=` with a login environment
(HOME, USER, LOGNAME, SHELL, PATH, TERM, SSH_CONNECTION), the user's shell (`-l` for a login shell, `-c` for a
command), in the home directory. A PTY request gets a real pty whose slave is the child's controlling terminal
(util-linux `setsid --ctty`, so no preexec_fn runs in the daemon); exec without a pty gets pipes. Subsystems
(sftp, so also OpenSSH 9's scp) are refused for now: asyncssh serves sftp only in-process, and it must run as
the user. Port forwarding, agent and X11 forwarding are
refused: a forwarded connection would leave from this node and bypass the peers' packet filters. Every login and
refusal is an audit line (who, as whom, from where, when) on the `shoal.ssh` logger.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import logging
import os
import pwd
import socket
import struct
import termios
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import asyncssh

from coord import wire

from .decide import Decision, decide, who

log = logging.getLogger("shoal.ssh")

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same value
LISTEN_PORT = 41022
PATH = "/usr/local/bin:/usr/bin:/bin"


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """The destination before the nft redirect (conntrack's original tuple)."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        port = struct.unpack_from("!H", raw, 2)[0]
        addr = ipaddress.IPv6Address(raw[8:24])
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped), port
        return str(addr), port
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntoa(raw[4:8]), port


def load_host_key(path: Path) -> asyncssh.SSHKey:
    """The host key, created 0600 on first use (never logged)."""
    if path.exists():
        return asyncssh.read_private_key(str(path))
    key = asyncssh.generate_private_key("ssh-ed25519")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.export_private_key())
    return key


class SshServer:
    """`set(policy, own)` with each netmap; `start()`/`close()` with `--ssh` on and off."""

    def __init__(self, host_key: Path, port: int = LISTEN_PORT, hosts: Iterable[str] = ("0.0.0.0", "::"),
                 now: Callable[[], float] | None = None) -> None:
        self.host_key_path = host_key
        self.port = port
        self.hosts = list(hosts)
        self.policy: wire.SSHPolicy | None = None
        self.own: tuple[str, ...] = ()
        self._server: asyncssh.SSHAcceptor | None = None
        self._procs: set[asyncio.subprocess.Process] = set()

    def set(self, policy: wire.SSHPolicy | None, own: Iterable[str]) -> None:
        self.policy = policy
        self.own = tuple(own)

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        if self._server is not None:
            return
        key = load_host_key(self.host_key_path)
        self._server = await asyncssh.create_server(
            lambda: _Conn(self), self.hosts, self.port, server_host_keys=[key], process_factory=self._session,
            agent_forwarding=False, x11_forwarding=False, allow_scp=False, reuse_address=True,
            encoding=None, line_editor=False,  # bytes through, as the pty gives them
        )

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def _session(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        conn: _Conn = process.get_extra_info("connection").get_owner()
        d = conn.decision
        if d is None or not d.allowed:  # never: auth refused before any session
            process.exit(255)
            return
        try:
            rc = await self._run(process, conn, d)
        except (OSError, KeyError) as e:
            log.warning("ssh: session for %s as %s failed: %s", who(d.principal), d.local_user, e)
            process.stderr.write(f"shoal ssh: {e}\r\n".encode())
            rc = 255
        process.exit(rc)

    async def _run(self, process: asyncssh.SSHServerProcess[bytes], conn: _Conn, d: Decision) -> int:
        pw = pwd.getpwnam(d.local_user)
        shell = pw.pw_shell or "/bin/sh"
        home = pw.pw_dir if os.path.isdir(pw.pw_dir) else "/"
        env = {"HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name, "SHELL": shell, "PATH": PATH,
               "SSH_CONNECTION": f"{conn.peer[0]} {conn.peer[1]} {conn.dst[0]} {conn.dst[1]}"}
        term = process.get_terminal_type()
        if term:
            env["TERM"] = term
        if process.subsystem:  # asyncssh refuses subsystem requests before this (no sftp_factory): never
            raise OSError(f"subsystem {process.subsystem!r} is not served")
        argv = [shell, "-c", process.command] if process.command is not None else [shell, "-l"]
        ids: dict[str, Any] = {"user": pw.pw_uid, "group": pw.pw_gid,
                               "extra_groups": os.getgrouplist(pw.pw_name, pw.pw_gid)}
        log.info("ssh: %s from %s logged in as %s (%s): %s", who(d.principal), conn.peer[0], pw.pw_name, d.reason,
                 "shell" if process.command is None and not process.subsystem else "exec")
        if term is not None and not process.subsystem:
            return await self._run_pty(process, ["/usr/bin/setsid", "--ctty", *argv], env, home, ids)
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=env, cwd=home, close_fds=True, **ids)
        self._procs.add(proc)
        try:
            await process.redirect(stdin=proc.stdin, stdout=proc.stdout, stderr=proc.stderr)
            rc = await proc.wait()
            await process.stdout.drain()
            return rc if rc >= 0 else 128 - rc
        finally:
            self._procs.discard(proc)

    async def _run_pty(self, process: asyncssh.SSHServerProcess[bytes], argv: list[str], env: dict[str, str],
                       home: str, ids: dict[str, Any]) -> int:
        master, slave = os.openpty()
        try:
            _winsize(slave, process.get_terminal_size())
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=home, close_fds=True, **ids)
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def readable() -> None:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every slave fd is closed, the session is over
                data = b""
            if not data:
                loop.remove_reader(master)
                done.set()
            else:
                process.stdout.write(data)

        async def feed() -> None:
            while True:
                try:
                    data = await process.stdin.read(65536)
                except asyncssh.TerminalSizeChanged as e:
                    _winsize(master, (e.width, e.height, e.pixwidth, e.pixheight))
                    continue
                if not data:
                    return
                os.write(master, data)

        loop.add_reader(master, readable)
        feeder = asyncio.create_task(feed())
        try:
            rc = await proc.wait()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 2.0)
            await process.stdout.drain()
            return rc if rc >= 0 else 128 - rc
        finally:
            feeder.cancel()
            loop.remove_reader(master)
            os.close(master)


def _winsize(fd: int, size: tuple[int, int, int, int]) -> None:
    cols, rows, xpix, ypix = size
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows or 24, cols or 80, xpix, ypix))


class _Conn(asyncssh.SSHServer):
    def __init__(self, server: SshServer) -> None:
        self.server = server
        self.peer: tuple[str, int] = ("", 0)
        self.dst: tuple[str, int] = ("", 0)
        self.decision: Decision | None = None
        self.conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername")
        self.peer = (_unmap(peer[0]), int(peer[1]))
        sock = conn.get_extra_info("socket")
        try:
            self.dst = original_dst(sock)
        except (OSError, AttributeError):
            self.dst = ("", 0)

    def begin_auth(self, username: str) -> bool:
        s = self.server
        d = decide(s.policy, self.peer[0], self.dst[0], self.dst[1], username, s.own)
        self.decision = d
        if d.allowed:
            return False  # no authentication: the tailnet identity is the credential
        log.warning("ssh: refused %s from %s as %s: %s", who(d.principal), self.peer[0], username, d.reason)
        if self.conn is not None:
            self.conn.send_auth_banner(f"shoal: {d.reason}\r\n")
        return True

    def public_key_auth_supported(self) -> bool:
        return True  # offered so the client has a method to fail; no key is ever valid

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return False


def _unmap(addr: str) -> str:
    try:
        a = ipaddress.ip_address(addr.split("%")[0])
    except ValueError:
        return addr
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        return str(a.ipv4_mapped)
    return str(a)
