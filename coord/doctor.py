"""``shoal-server doctor``: checks a deployment and says what to fix.

Each check gives a ``Check(name, status, detail, fix)``; status is ``ok``, ``warn`` or ``fail`` (exit 1 when any
fails). What is checked, from the same config ``serve`` reads:

- the data dir and its secrets: the dir 0700, ``server.key``, ``derp.key``, ``checkpoint.key``, the database and
  its WAL files and the admin socket no wider than 0600 (the server narrows them at start; a backup restore or a
  copy may not have);
- the server URL: ``GET {server_url}/key`` answers, and with this data dir's key (else the URL reaches another
  server, or a proxy points elsewhere); plain ``http://`` to a non-loopback host is a warning;
- the clock: the log's last event is not in the future (a clock that went back) and the server's ``Date`` header,
  when it comes through a proxy on another host, is within 30 s;
- the relays of the DERP map (embedded and ``derp_map_file``): each answers ``/derp/probe``, and its STUN port a
  binding request;
- the metrics listener answers ``/metrics``;
- storage: SQLite's file, or with ``postgres`` set, that PostgreSQL answers (read only: doctor runs no migration),
  its log head, and each replica's heartbeat (a replica silent for ``REPLICA_STALE_S`` is down, one behind the head
  is lagging). The URL is shown with its password hidden.

The verdicts on what was observed (``mode_check``, ``clock_check``, ``key_check``) are pure; the probes are thin.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from nacl.public import PrivateKey

from coord import wire
from coord.config import Config, parse_hostport
from derp import stun

SKEW_WARN = 30.0  # seconds
REPLICA_STALE_S = 5.0  # as coord/app.py: a replica whose heartbeat is older is down
REPLICA_LAG_WARN = 100  # events behind the head
TIMEOUT = 3.0
SECRETS = ("server.key", "derp.key", "checkpoint.key", "shoal.db", "shoal.db-wal", "shoal.db-shm", "admin.sock")


class Status(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""

    def as_json(self) -> dict[str, str]:
        return {"name": self.name, "status": str(self.status), "detail": self.detail, "fix": self.fix}


def mode_check(name: str, path: Path, mode: int | None, allowed: int) -> Check:
    """A file's (or dir's) permission bits against the widest allowed; None: it does not exist."""
    if mode is None:
        return Check(name, Status.OK, f"{path}: not there yet (created {oct(allowed)} at first start)")
    if mode & ~allowed:
        return Check(name, Status.FAIL, f"{path} is {oct(mode)}, readable by others",
                     f"chmod {oct(allowed)[2:]} {path}  (and check who copied it that way)")
    return Check(name, Status.OK, f"{path} is {oct(mode)}")


def key_check(url: str, status: int | None, body: Any, want_key: str | None, error: str = "") -> Check:
    if status is None:
        return Check("server_url", Status.FAIL, f"{url}/key: {error or 'no answer'}",
                     "start the server (systemctl start shoal-server), or make server_url match where it listens "
                     "(listen) or the proxy in front of it")
    if status != 200 or not isinstance(body, dict) or "publicKey" not in body:
        return Check("server_url", Status.FAIL, f"{url}/key answered {status}, not a Shoal server's key",
                     "server_url points at something else (a proxy route?); nodes dial exactly this URL")
    if want_key is not None and body["publicKey"] != want_key:
        return Check("server_url", Status.FAIL, f"{url} answers with key {body['publicKey']}, this data dir has "
                     f"{want_key}", "server_url reaches another server: fix the URL, the proxy, or --data")
    host = urlsplit(url).hostname or ""
    if url.startswith("http://") and host not in ("127.0.0.1", "::1", "localhost"):
        return Check("server_url", Status.WARN, f"{url} answers, over plain HTTP",
                     "use https (tls_cert/tls_key or a TLS proxy): control bodies are sealed, but sign-in pages "
                     "and the relay's TLS are not")
    return Check("server_url", Status.OK, f"{url} answers with this server's key")


def clock_check(now: float, last_event: float | None, server_date: float | None) -> Check:
    if last_event is not None and last_event > now + 5:
        return Check("clock", Status.FAIL, f"the log's last event is {last_event - now:.0f} s in the future",
                     "the clock went back: fix NTP (timedatectl status); new events keep the log's order meanwhile")
    if server_date is not None and abs(server_date - now) > SKEW_WARN:
        return Check("clock", Status.WARN, f"the server's clock is {server_date - now:+.0f} s from this host's",
                     "sync both clocks (NTP): key expiry and sign-in links depend on them")
    return Check("clock", Status.OK, "the clock agrees with the log" + (" and the server" if server_date else ""))


async def _get(http: httpx.AsyncClient, url: str) -> tuple[int | None, httpx.Response | None, str]:
    try:
        # A fresh connection each: the embedded relay answers its paths only as a connection's first request.
        r = await http.get(url, timeout=TIMEOUT, headers={"Connection": "close"})
    except httpx.HTTPError as e:
        return None, None, str(e) or type(e).__name__
    return r.status_code, r, ""


def _stun_probe(host: str, port: int) -> str:
    """'' when a binding response came back, else why not."""
    txid = os.urandom(12)
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    except OSError as e:
        return f"cannot resolve {host}: {e}"
    with socket.socket(info[0], socket.SOCK_DGRAM) as s:
        s.settimeout(TIMEOUT)
        try:
            s.sendto(stun.build_request(txid), info[4])
            data = s.recv(2048)
            stun.parse_response(data)
        except (OSError, stun.StunError) as e:
            return str(e) or type(e).__name__
    return ""


async def relay_checks(config: Config, http: httpx.AsyncClient) -> list[Check]:
    from coord.app import derp_map

    out = []
    regions = derp_map(config)["Regions"]
    if not regions:
        return [Check("relays", Status.WARN, "no DERP relays: nodes behind hard NATs cannot reach each other",
                      "keep the embedded relay (derp = true) or give derp_map_file")]
    for rid, region in sorted(regions.items()):
        for node in region.get("Nodes", []):
            name = f"relay {rid}/{node.get('Name', '?')}"
            url = node.get("URL") or f"https://{node.get('HostName')}:{node.get('DERPPort', 443)}/derp"
            status, _, err = await _get(http, url.rstrip("/") + "/probe")
            if status != 200:
                out.append(Check(name, Status.FAIL, f"{url}/probe: {err or status}",
                                 "the relay is down or unreachable from here; nodes fall back to other regions"))
                continue
            port = int(node.get("STUNPort", 3478) or 0)
            if port > 0:
                why = await asyncio.to_thread(_stun_probe, str(node.get("HostName")), port)
                if why:
                    out.append(Check(name, Status.WARN, f"{url} answers, STUN on UDP {port} does not ({why})",
                                     "open UDP port to the relay's STUN server, or set STUNPort -1 in the map"))
                    continue
            out.append(Check(name, Status.OK, f"{url} answers" + (f", STUN on UDP {port} too" if port > 0 else "")))
    return out


async def last_event_time(config: Config) -> float | None:
    from coord.store import Filter
    from coord.store.sqlite import SqliteStore

    if config.postgres:
        return await _pg_last_time(config.postgres)
    path = config.data_path / "shoal.db"
    if not path.exists():
        return None
    store = await SqliteStore.open(path)
    try:
        seq, _ = await store.last()
        async for r in store.read(Filter(since_seq=max(0, seq - 1))):
            return r.ts
        return None
    finally:
        await store.close()


async def _pg_last_time(dsn: str) -> float | None:
    import asyncpg

    from coord.wire.schema import parse_time

    try:
        conn = await asyncpg.connect(dsn, timeout=TIMEOUT)
    except Exception:
        return None  # the storage check says why
    try:
        text = await conn.fetchval("SELECT time FROM events ORDER BY seq DESC LIMIT 1")
        return parse_time(str(text)) if text is not None else None
    except Exception:
        return None
    finally:
        await conn.close()


def redact(dsn: str) -> str:
    u = urlsplit(dsn)
    if u.password is None:
        return dsn
    netloc = u.netloc.replace(f":{u.password}@", ":***@", 1)
    return u._replace(netloc=netloc).geturl()


def pg_checks(dsn: str, error: str, head: int | None, replicas: list[dict[str, Any]], now: float) -> list[Check]:
    """The verdict on what ``pg_probe`` saw: the database answered, its log head, every replica's heartbeat."""
    where = redact(dsn)
    if error:
        return [Check("storage", Status.FAIL, f"PostgreSQL {where}: {error}",
                      "check the postgres URL, that the server runs and that pg_hba.conf lets this host in")]
    if head is None:
        return [Check("storage", Status.WARN, f"PostgreSQL {where} answers but holds no Shoal log",
                      "start shoal-server once with this postgres URL (it migrates the database)")]
    out = [Check("storage", Status.OK, f"PostgreSQL {where}, log head {head}; run `shoal-server events verify` to "
                 "check the hash chain")]
    if not replicas:
        out.append(Check("replicas", Status.WARN, "no replica has reported a heartbeat",
                         "start shoal-server with this postgres URL"))
    for r in replicas:
        age, behind = now - float(r["seen"]), head - int(r["seq"])
        name = f"replica {r['name']}"
        at = "" if r["url"] == r["name"] else f"{r['url']}: "
        if age > REPLICA_STALE_S:
            out.append(Check(name, Status.WARN, f"{at}last heartbeat {age:.0f}s ago (down)",
                             "restart it, or ignore if it was retired (its row stays until it returns)"))
        elif behind > REPLICA_LAG_WARN:
            out.append(Check(name, Status.WARN, f"{at}{behind} events behind the head",
                             "it is catching up; if this lasts, check its logs and its link to PostgreSQL"))
        else:
            out.append(Check(name, Status.OK, f"{at}up, {int(r['streams'])} streams, at seq {r['seq']}"))
    return out


async def pg_probe(dsn: str) -> tuple[str, int | None, list[dict[str, Any]]]:
    """(error, log head or None when there is no log, replica rows); reads only."""
    import asyncpg  # only when PostgreSQL is configured

    try:
        conn = await asyncpg.connect(dsn, timeout=TIMEOUT)
    except Exception as e:
        return f"{type(e).__name__}: {e}", None, []
    try:
        tables = {r[0] for r in await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()")}
        if "events" not in tables:
            return "", None, []
        head = int(await conn.fetchval("SELECT COALESCE(MAX(seq), 0) FROM events"))
        rows = [dict(r) for r in await conn.fetch("SELECT name, url, seq, streams, seen FROM replicas ORDER BY name")] \
            if "replicas" in tables else []
        return "", head, rows
    except Exception as e:
        return f"{type(e).__name__}: {e}", None, []
    finally:
        await conn.close()


def local_key(data: Path) -> str | None:
    """This data dir's server key, read without touching the file (the server's loader narrows its mode)."""
    try:
        raw = bytes.fromhex((data / "server.key").read_text().strip().removeprefix("privkey:"))
    except (OSError, ValueError):
        return None
    return wire.key_text("mkey", bytes(PrivateKey(raw).public_key)) if len(raw) == 32 else None


def _mode(path: Path) -> int | None:
    try:
        return stat.S_IMODE(os.lstat(path).st_mode)
    except FileNotFoundError:
        return None


async def run(config: Config, http: httpx.AsyncClient, clock: Callable[[], float] = time.time) -> list[Check]:
    data = config.data_path
    checks = [Check("config", Status.OK, f"server_url {config.server_url}, listen {config.listen}, data {data}")]
    if not data.exists():
        checks.append(Check("data_dir", Status.FAIL, f"{data} does not exist",
                            "give --data (or data_dir) of the server, or start it once to create it"))
        return checks
    checks.append(mode_check("data_dir", data, _mode(data), 0o700))
    checks += [mode_check(f"file {name}", data / name, _mode(data / name), 0o600) for name in SECRETS
               if name == "server.key" or (data / name).exists()]
    url = config.server_url.rstrip("/")
    status, resp, err = await _get(http, f"{url}/key")
    body: Any = None
    if resp is not None:
        with contextlib.suppress(ValueError):
            body = resp.json()
    checks.append(key_check(url, status, body, local_key(data), err))
    server_date = None
    if resp is not None and "date" in resp.headers:
        with contextlib.suppress(TypeError, ValueError):
            server_date = parsedate_to_datetime(resp.headers["date"]).timestamp()
    checks.append(clock_check(clock(), await last_event_time(config), server_date))
    if status is not None:
        checks += await relay_checks(config, http)
    if config.metrics_listen:
        host, port = parse_hostport(config.metrics_listen, "metrics_listen")
        murl = f"http://{'[' + host + ']' if ':' in host else host}:{port}/metrics"
        mstatus, _, merr = await _get(http, murl)
        checks.append(Check("metrics", Status.OK, f"{murl} answers") if mstatus == 200 else
                      Check("metrics", Status.WARN, f"{murl}: {merr or mstatus}",
                            "the server logs why at start (port taken?); set metrics_listen, or '' for none"))
    if config.postgres:
        checks += pg_checks(config.postgres, *(await pg_probe(config.postgres)), clock())
    else:
        checks.append(Check("storage", Status.OK, f"SQLite {data / 'shoal.db'} (durability {config.durability}); "
                            "run `shoal-server events verify` to check the hash chain"))
    return checks


def render(checks: list[Check]) -> str:
    lines = []
    for c in checks:
        lines.append(f"{c.status.upper():<4}  {c.name}: {c.detail}")
        if c.fix and c.status is not Status.OK:
            lines.append(f"      fix: {c.fix}")
    fails = sum(c.status is Status.FAIL for c in checks)
    warns = sum(c.status is Status.WARN for c in checks)
    lines.append(f"{fails} to fix, {warns} warning(s)" if fails or warns else "all good")
    return "\n".join(lines)


async def doctor(config: Config) -> tuple[int, list[Check]]:
    async with httpx.AsyncClient(follow_redirects=False) as http:
        checks = await run(config, http)
    return (1 if any(c.status is Status.FAIL for c in checks) else 0), checks

