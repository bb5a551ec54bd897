"""``shoal-server``: run the coordination server, and administer it.

Admin commands talk to the running server over its admin socket (``<data dir>/admin.sock``); when no server holds
the data dir they run in-process against the database. ``events`` commands read the log directly. Every command
takes ``--json``; errors are one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import httpx

from coord import admin, logcmd, policy, views, webhooks
from coord import events as ev
from coord.config import Config, LogLevel, load, parse_duration
from coord.errors import CoordError, LocalError
from coord.lock import ServerLock

EXIT_ERROR = 1
EXIT_USAGE = 2


class CliError(LocalError):
    """A command that cannot run as given (a missing file, a server that must be running)."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"shoal-server: {message} (see --help)\n")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    # SUPPRESS: otherwise a subcommand's default would overwrite a value given before the subcommand.
    common.add_argument("--config", default=argparse.SUPPRESS, help="TOML config file (default: $SHOAL_CONFIG)")
    common.add_argument("--data", dest="data_dir", default=argparse.SUPPRESS,
                        help="data directory (default ./data or $SHOAL_DATA)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")

    p = Parser(prog="shoal-server", description="Shoal coordination server and admin CLI.", parents=[common])
    sub = p.add_subparsers(dest="group", required=True, parser_class=Parser)

    serve = sub.add_parser("serve", parents=[common], help="run the server")
    serve.add_argument("--listen", help="host:port for HTTP (default 127.0.0.1:8080)")
    serve.add_argument("--server-url", help="URL nodes use to reach this server")
    serve.add_argument("--no-derp", action="store_true", help="do not run the embedded DERP relay")
    serve.add_argument("--stun-listen", help="host:port for the embedded STUN server ('' to disable)")
    serve.add_argument("--metrics-listen",
                       help="host:port for Prometheus /metrics (default 127.0.0.1:9470; '' to disable)")
    serve.add_argument("--derp-map-file", help="JSON file with extra DERP regions")
    serve.add_argument("--ephemeral-timeout", help="e.g. 120s")
    serve.add_argument("--key-expiry", help="e.g. 180d, or 0 for never")
    serve.add_argument("--batch-delay", help="fan-out tick, e.g. 50ms")
    serve.add_argument("--keepalive", help="map stream keep-alive, e.g. 50s")
    serve.add_argument("--log-level", choices=[str(level) for level in LogLevel])
    o = serve.add_argument_group("sign-in with OpenID Connect (the [oidc] config table; lists comma-separated)")
    o.add_argument("--oidc-issuer", help="the identity provider's issuer URL (turns sign-in on)")
    o.add_argument("--oidc-client-id")
    o.add_argument("--oidc-client-secret-file", help="file holding the client secret")
    o.add_argument("--oidc-client-secret-env", help="environment variable holding the client secret")
    o.add_argument("--oidc-scopes", help="default openid,email,profile")
    o.add_argument("--oidc-allowed-domains", help="verified e-mail domains admitted")
    o.add_argument("--oidc-allowed-users", help="verified e-mail addresses admitted")
    o.add_argument("--oidc-allowed-groups", help="IdP groups admitted")
    o.add_argument("--oidc-groups-claim", help="dotted claim path holding the groups (default groups)")
    o.add_argument("--oidc-user-name", choices=["email", "preferred_username", "sub"])
    o.add_argument("--oidc-expiry-from-token", action="store_true", default=None,
                   help="node key expiry from the ID token")
    o.add_argument("--oidc-allow-http", action="store_true", default=None,
                   help="allow an http:// server URL off loopback (labs)")
    o.add_argument("--oidc-group-map", action="append", metavar="IDP_GROUP=group:NAME",
                   help="IdP group -> policy group (repeatable)")
    d = serve.add_argument_group("MagicDNS (the [dns] config table; seeds the settings `dns set` changes)")
    d.add_argument("--dns-magic-dns", metavar="on|off")
    d.add_argument("--dns-nameservers", metavar="ADDR[,ADDR]", help="global upstream resolvers")
    d.add_argument("--dns-split", action="append", metavar="SUFFIX=ADDR[,ADDR]", help="split DNS (repeatable)")
    d.add_argument("--dns-search-domains", metavar="DOMAIN[,DOMAIN]")
    d.add_argument("--dns-override-local-dns", metavar="on|off")
    d.add_argument("--dns-extra-record", dest="dns_extra_records", action="append", metavar="'NAME TYPE VALUE'",
                   help="an A/AAAA record (repeatable)")
    d.add_argument("--dns-extra-records-file", metavar="PATH", help="JSON records file, watched for changes")
    serve.add_argument("--durability", choices=["normal", "full"],
                       help="normal: commits survive a process crash; full: also an OS crash or power loss")
    serve.add_argument("--tls-cert", help="PEM certificate (chain) to serve HTTPS with; needs --tls-key")
    serve.add_argument("--tls-key", help="PEM private key of --tls-cert")
    serve.add_argument("--trusted-proxies", help="addresses/prefixes of reverse proxies whose X-Forwarded-For "
                                                 "is believed (comma-separated; default none)")


    sub.add_parser("replicas", parents=[common],
                   help="replicas on the shared PostgreSQL: who is up, lag behind the head, streams")
    users = sub.add_parser("users", parents=[common], help="manage users").add_subparsers(
        dest="cmd", required=True, parser_class=Parser
    )
    u = users.add_parser("create", parents=[common])
    u.add_argument("name")
    u = users.add_parser("list", parents=[common])
    g = u.add_mutually_exclusive_group()
    g.add_argument("--at", help="show users as they were at this time (RFC 3339)")
    g.add_argument("--at-seq", type=int, metavar="N", help="show users as they were right after event N")
    u = users.add_parser("rename", parents=[common])
    u.add_argument("user")
    u.add_argument("name")
    u = users.add_parser("delete", parents=[common])
    u.add_argument("user")
    u = users.add_parser("role", parents=[common], help="set a user's role (the only way to make an owner)")
    u.add_argument("user")
    u.add_argument("role", help="owner, admin, network-admin, it-admin, billing-admin, auditor or member")

    tokens = sub.add_parser("tokens", parents=[common], help="API access tokens and OAuth clients (API v2)"
                            ).add_subparsers(dest="cmd", required=True, parser_class=Parser)
    t = tokens.add_parser("create", parents=[common], help="an API access token of a user (shown once)")
    t.add_argument("--user", required=True)
    t.add_argument("--expiry", default="90d", help="lifetime (default 90d)")
    t.add_argument("--description", default="")
    t = tokens.add_parser("client", parents=[common], help="an OAuth client (client id and secret, shown once)")
    t.add_argument("--user", required=True, help="the user auth keys it creates belong to")
    t.add_argument("--scopes", required=True, help="comma-separated, e.g. devices:core:read,auth_keys")
    t.add_argument("--tags", default="", help="tags its auth keys may carry, e.g. tag:ci")
    t.add_argument("--description", default="")
    tokens.add_parser("list", parents=[common])
    t = tokens.add_parser("revoke", parents=[common])
    t.add_argument("id")

    keys = sub.add_parser("keys", parents=[common], help="manage pre-auth keys").add_subparsers(
        dest="cmd", required=True, parser_class=Parser
    )
    k = keys.add_parser("create", parents=[common])
    k.add_argument("--user", required=True)
    k.add_argument("--reusable", action="store_true")
    k.add_argument("--ephemeral", action="store_true")
    k.add_argument("--expiration", default="24h", help="lifetime, e.g. 1h, 24h, 90d (default 24h)")
    k.add_argument("--tags", default="", help="comma-separated tag:name list; nodes become owned by the tags")
    keys.add_parser("list", parents=[common])
    k = keys.add_parser("revoke", parents=[common])
    k.add_argument("key", help="key prefix or id")

    devices = sub.add_parser("devices", parents=[common], help="plain-WireGuard devices (no agent)").add_subparsers(
        dest="cmd", required=True, parser_class=Parser
    )
    w = devices.add_parser("add-wg", parents=[common],
                           help="a device with a stock WireGuard app, carried by a hub node; prints its config once")
    w.add_argument("name")
    w.add_argument("--via", required=True, metavar="NODE", help="the hub: an agent with a reachable UDP endpoint")
    w.add_argument("--user", required=True, help="the device's owner (what the policy matches)")
    w.add_argument("--endpoint", help="HOST:PORT the device dials (default: the first endpoint the hub reported)")
    w.add_argument("--qr-png", metavar="FILE", help="also write the QR code here (mode 0600; default NAME.png)")
    w.add_argument("--no-qr", action="store_true", help="print the config without the terminal QR code")
    w = devices.add_parser("revoke", parents=[common], help="remove a device everywhere (as nodes delete)")
    w.add_argument("node")

    nodes = sub.add_parser("nodes", parents=[common], help="manage nodes").add_subparsers(
        dest="cmd", required=True, parser_class=Parser
    )
    n = nodes.add_parser("list", parents=[common])
    g = n.add_mutually_exclusive_group()
    g.add_argument("--at", help="show nodes as they were at this time (RFC 3339)")
    g.add_argument("--at-seq", type=int, metavar="N", help="show nodes as they were right after event N")
    for name in ("show", "expire", "delete"):
        nodes.add_parser(name, parents=[common]).add_argument("node", help="node id or name")
    n = nodes.add_parser("history", parents=[common],
                         help="a node's online/offline intervals, endpoints, key rotations and renames (from the log)")
    n.add_argument("node", help="node id or name (a name it had before counts)")
    n.add_argument("--since", help="only from this time on (RFC 3339)")
    n.add_argument("--until", help="only up to this time (RFC 3339)")
    n = nodes.add_parser("rename", parents=[common])
    n.add_argument("node")
    n.add_argument("name")
    n = nodes.add_parser("tag", parents=[common])
    n.add_argument("node")
    n.add_argument("--tags", required=True, help="comma-separated tag:name list ('' to clear)")
    n = nodes.add_parser("expiry", parents=[common], help="set or disable a node's key expiry")
    n.add_argument("node")
    g = n.add_mutually_exclusive_group(required=True)
    g.add_argument("--never", action="store_true", help="the node's key never expires")
    g.add_argument("--in", dest="expires_in", help="expire after this long from now, e.g. 30d")
    n = nodes.add_parser("approve", parents=[common], help="approve a pending registration")
    n.add_argument("id", help="the id in the login URL")
    n.add_argument("--user", required=True)
    nodes.add_parser("pending", parents=[common], help="list registrations waiting for approval")

    rt = sub.add_parser("routes", parents=[common], help="subnet routes and exit nodes").add_subparsers(
        dest="cmd", required=True, parser_class=Parser
    )
    rt.add_parser("list", parents=[common], help="advertised, approved and primary routes per router")
    for name, verb in (("approve", "approve"), ("unapprove", "withdraw the approval of")):
        r = rt.add_parser(name, parents=[common], help=f"{verb} a node's routes (0.0.0.0/0 or ::/0: exit node)")
        r.add_argument("node", help="node id or name")
        r.add_argument("routes", nargs="+", metavar="CIDR")

    pol = sub.add_parser("policy", parents=[common], help="access policy (HuJSON)").add_subparsers(
        dest="cmd", required=True, parser_class=Parser
    )
    x = pol.add_parser("set", parents=[common], help="validate, run its tests, and apply a policy file")
    x.add_argument("file")
    pol.add_parser("get", parents=[common], help="print the policy in force")
    pol.add_parser("history", parents=[common], help="when the policy was set, and by whom")
    pol.add_parser("clear", parents=[common], help="remove the policy (allow all, as with no policy)")
    x = pol.add_parser("check", parents=[common], help="validate a file and run its tests without saving it")
    x.add_argument("file")
    x.add_argument("--tailnet", help="JSON file describing users' roles and nodes the tests may rely on")
    x = pol.add_parser("diff", parents=[common], help="what a file would change against the current tailnet")
    x.add_argument("file")

    dns = sub.add_parser("dns", parents=[common], help="MagicDNS settings and extra records").add_subparsers(
        dest="cmd", required=True, parser_class=Parser
    )
    dns.add_parser("get", parents=[common], help="the DNS settings, and the DNSConfig every node is sent")
    x = dns.add_parser("set", parents=[common], help="change DNS settings (each change is an event)")
    x.add_argument("--magic-dns", choices=["on", "off"])
    x.add_argument("--base-domain", metavar="DOMAIN",
                   help="the suffix of every node's name (default: the config's base_domain); every node gets its "
                        "new names at once")
    x.add_argument("--nameserver", action="append", metavar="ADDR",
                   help="global upstream (repeatable; replaces the list; '' clears it)")
    x.add_argument("--split", action="append", metavar="SUFFIX=ADDR[,ADDR]",
                   help="split DNS for a suffix (repeatable; SUFFIX= removes the suffix)")
    x.add_argument("--clear-split", action="store_true", help="remove every split DNS route first")
    x.add_argument("--search", action="append", metavar="DOMAIN",
                   help="search domain after the base domain (repeatable; replaces the list; '' clears it)")
    x.add_argument("--override-local-dns", choices=["on", "off"],
                   help="on: the nameservers answer everything; off: the host's resolvers stay, nameservers back "
                        "them up")
    rec = dns.add_parser("records", parents=[common], help="extra A/AAAA records").add_subparsers(
        dest="rcmd", required=True, parser_class=Parser
    )
    rec.add_parser("list", parents=[common])
    x = rec.add_parser("add", parents=[common])
    x.add_argument("name")
    x.add_argument("type", metavar="TYPE", help="A or AAAA")
    x.add_argument("value")
    x = rec.add_parser("remove", parents=[common], help="remove a name's records (only TYPE VALUE if given)")
    x.add_argument("name")
    x.add_argument("type", nargs="?", metavar="TYPE")
    x.add_argument("value", nargs="?")

    wh = sub.add_parser("webhooks", parents=[common], help="webhook endpoints (Tailscale's body and signature)") \
        .add_subparsers(dest="cmd", required=True, parser_class=Parser)
    wh.add_parser("list", parents=[common], help="endpoints, their cursors and last delivery")
    x = wh.add_parser("add", parents=[common], help="add an endpoint; its signing secret is shown once")
    x.add_argument("url")
    x.add_argument("--events", default="", metavar="TYPE[,TYPE]",
                   help="Tailscale event types to send (default: all): " + ", ".join(webhooks.TYPES))
    wh.add_parser("remove", parents=[common]).add_argument("endpoint", help="endpoint id")
    wh.add_parser("test", parents=[common], help="post a signed test event now").add_argument("endpoint")
    wh.add_parser("rotate", parents=[common], help="a new signing secret, shown once").add_argument("endpoint")
    x = wh.add_parser("update", parents=[common], help="replace an endpoint's event types")
    x.add_argument("endpoint")
    x.add_argument("--events", required=True, metavar="TYPE[,TYPE]")
    x = wh.add_parser("deliveries", parents=[common], help="delivery attempts, oldest first")
    x.add_argument("endpoint", nargs="?", help="endpoint id (default: all)")
    x.add_argument("-n", "--limit", type=int, default=50)
    logcmd.add_parsers(sub, common, Parser)
    sub.add_parser("doctor", parents=[common],
                   help="check a deployment: URL, key and database modes, clock, relays, metrics; says what to fix")
    return p


def config_from(args: argparse.Namespace) -> Config:
    overrides: dict[str, Any] = {"data_dir": args.data_dir}
    if args.group == "serve":
        overrides.update(
            listen=args.listen, server_url=args.server_url, stun_listen=args.stun_listen,
            metrics_listen=args.metrics_listen,
            derp_map_file=args.derp_map_file, ephemeral_timeout=args.ephemeral_timeout,
            key_expiry=args.key_expiry, batch_delay=args.batch_delay, keepalive=args.keepalive,
            log_level=args.log_level, derp=False if args.no_derp else None, durability=args.durability,
            tls_cert=args.tls_cert, tls_key=args.tls_key, trusted_proxies=args.trusted_proxies,
        )
        overrides.update({k: v for k, v in vars(args).items()
                          if k.startswith(("oidc_", "dns_")) and v is not None})
    return load(args.config or os.environ.get("SHOAL_CONFIG"), overrides=overrides)


# --- admin commands: socket or in-process ---------------------------------------------------------------


def _split_tags(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def admin_request(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    g, c = args.group, getattr(args, "cmd", None)
    if g == "info":
        return "info", {}
    if g == "replicas":
        return "replicas", {}
    if g == "users":
        return f"users.{c}", {k: getattr(args, k, None) for k in ("name", "user", "at", "at_seq", "role")}
    if g == "tokens":
        if c == "create":
            return "tokens.create", {"user": args.user, "description": args.description,
                                     "expiry": parse_duration(args.expiry, "--expiry")}
        if c == "client":
            return "tokens.client", {"user": args.user, "description": args.description,
                                     "scopes": _split_tags(args.scopes), "tags": _split_tags(args.tags)}
        return f"tokens.{c}", {"id": getattr(args, "id", None)}
    if g == "keys":
        if c == "create":
            return "keys.create", {
                "user": args.user, "reusable": args.reusable, "ephemeral": args.ephemeral,
                "expiration": parse_duration(args.expiration, "--expiration"), "tags": _split_tags(args.tags),
            }
        return f"keys.{c}", {"key": getattr(args, "key", None)}
    if g == "nodes":
        a: dict[str, Any] = {k: getattr(args, k, None) for k in ("node", "name", "at", "at_seq", "id", "user")}
        if c == "tag":
            a["tags"] = _split_tags(args.tags)
        if c == "expiry":
            a["expiry"] = None if args.never else time.time() + parse_duration(args.expires_in, "--in")
        return f"nodes.{c}", a
    if g == "dns":
        return dns_request(args)
    if g == "routes":
        return f"routes.{c}", {"node": getattr(args, "node", None), "routes": getattr(args, "routes", None)}
    if g == "webhooks":
        if c == "add":
            return "webhooks.add", {"url": args.url, "events": _split_tags(args.events)}
        if c == "deliveries":
            return "webhooks.deliveries", {"endpoint": args.endpoint, "limit": args.limit}
        if c == "update":
            return "webhooks.update", {"endpoint": args.endpoint, "events": _split_tags(args.events)}
        return f"webhooks.{c}", {"endpoint": getattr(args, "endpoint", None)}
    if g == "policy":
        if c in ("set", "diff"):
            return f"policy.{c}", {"text": read_text(args.file), "filename": args.file}
        return f"policy.{c}", {}
    raise CliError(f"unknown command {g} {c}")


def _on_off(v: str | None) -> bool | None:
    return None if v is None else v == "on"


def dns_request(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    c = args.cmd
    if c == "get":
        return "dns.get", {}
    if c == "set":
        split: dict[str, list[str]] | None = None
        for item in args.split or ():
            suffix, sep, addrs = item.partition("=")
            if not sep or not suffix.strip():
                raise CliError(f"--split: {item!r} is not SUFFIX=ADDR[,ADDR] (SUFFIX= removes the suffix)")
            split = split or {}
            split[suffix.strip()] = [a.strip() for a in addrs.split(",") if a.strip()]
        a: dict[str, Any] = {
            "magic_dns": _on_off(args.magic_dns), "override_local_dns": _on_off(args.override_local_dns),
            "nameservers": args.nameserver, "search_domains": args.search, "split": split,
            "clear_split": args.clear_split, "base_domain": args.base_domain,
        }
        if all(v is None for k, v in a.items() if k != "clear_split") and not args.clear_split:
            raise CliError("dns set: nothing to change (see --help)")
        return "dns.set", a
    if args.rcmd == "list":
        return "dns.records.list", {}
    if args.rcmd == "add":
        return "dns.records.add", {"name": args.name, "type": args.type, "value": args.value}
    if args.type is not None and args.value is None:
        raise CliError("dns records remove: give NAME, or NAME TYPE VALUE")
    return "dns.records.remove", {"name": args.name, "type": args.type, "value": args.value}


def read_text(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise CliError(f"{path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise CliError(f"{path}: not UTF-8 text") from None


def policy_check(config: Config, args: argparse.Namespace) -> int:
    """Runs locally; the tailnet comes from --tailnet, or from this data dir's server, or is unknown."""
    text = read_text(args.file)
    tailnet: dict[str, Any] | None = None
    if args.tailnet:
        try:
            tailnet = json.loads(read_text(args.tailnet))
        except ValueError as e:
            raise CliError(f"{args.tailnet}: not JSON ({e})") from None
        if not isinstance(tailnet, dict):
            raise CliError(f"{args.tailnet}: expected a JSON object")
    elif (config.data_path / "shoal.db").exists():
        tailnet = run_admin(config, "policy.tailnet", {})
    result = policy.check(text, tailnet, filename=args.file)
    out(result, args, policy.render_check(result))
    return 0 if result["ok"] else EXIT_ERROR


def admin_via_socket(config: Config, command: str, cmd_args: dict[str, Any]) -> Any:
    sock = config.data_path / "admin.sock"
    transport = httpx.HTTPTransport(uds=str(sock))
    try:
        with httpx.Client(transport=transport, timeout=30) as client:
            r = client.post("http://shoal/admin", json={"command": command, "args": cmd_args})
    except httpx.HTTPError as e:
        raise CliError(f"cannot reach the server's admin socket {sock}: {e}") from None
    data = r.json()
    if r.status_code != 200:
        raise CliError(data.get("error", r.text))
    return data["result"]


async def admin_in_process(config: Config, command: str, cmd_args: dict[str, Any]) -> Any:
    """The command on a server built here and never started: no timers, no relay, no sockets."""
    # Imported here: the socket path, the common one, need not load the HTTP stack.
    from coord.app import create_app

    app = await create_app(config, serve=False)
    try:
        return await admin.run(app.admin, command, cmd_args)
    finally:
        await app.close()


def run_admin(config: Config, command: str, cmd_args: dict[str, Any]) -> Any:
    lock = ServerLock(config.data_path)
    if lock.try_acquire():
        try:
            if command in admin.NEEDS_SERVER:
                what = command.replace(".", " ")
                raise CliError(f"{what} needs the running server (start it with shoal-server serve)")
            return asyncio.run(admin_in_process(config, command, cmd_args))
        finally:
            lock.release()
    return admin_via_socket(config, command, cmd_args)


# --- output ---------------------------------------------------------------------------------------------


def _fmt_time(v: Any) -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return ev.rfc3339(v)[:19] + "Z"
    return "-" if v is None else str(v)


def table(rows: list[dict[str, Any]], cols: Sequence[tuple[str, str | Callable[[dict[str, Any]], Any]]]) -> str:
    cells = [[h for h, _ in cols]]
    for r in rows:
        cells.append([str(f(r) if callable(f) else r.get(f, "")) for _, f in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)


def render(command: str, result: Any) -> str:
    if command == "users.list":
        return table(result, [
            ("ID", "id"), ("NAME", "name"), ("PROVIDER", lambda r: r["provider"] or "-"),
            ("SUBJECT", lambda r: r["subject"] or "-"), ("EMAIL", lambda r: r["email"] or "-"),
            ("GROUPS", lambda r: ",".join(r["groups"]) or "-"), ("CREATED", "created"),
        ])
    if command == "nodes.list":
        return table(result, [
            ("ID", "id"), ("NAME", "name"), ("USER", lambda r: r["user"] or "-"),
            ("TAGS", lambda r: ",".join(r["tags"]) or "-"), ("IPV4", "ipv4"), ("IPV6", "ipv6"),
            ("ONLINE", lambda r: "yes" if r["online"] else "no"),
            ("STATE", lambda r: views.node_status(r)),
            ("LAST SEEN", lambda r: _fmt_time(r["last_seen"])),
        ])
    if command == "keys.list":
        return table(result, [
            ("ID", "id"), ("PREFIX", "prefix"), ("USER", "user"), ("REUSABLE", "reusable"),
            ("EPHEMERAL", "ephemeral"), ("TAGS", lambda r: ",".join(r["tags"]) or "-"),
            ("EXPIRATION", lambda r: r["expiration"] or "never"), ("USABLE", "usable"),
        ])
    if command == "routes.list":
        return table(result, [
            ("ID", "id"), ("NAME", "name"), ("ONLINE", lambda r: "yes" if r["online"] else "no"),
            ("ADVERTISED", lambda r: ",".join(r["advertised"]) or "-"),
            ("APPROVED", lambda r: ",".join(r["approved"]) or "-"),
            ("PRIMARY", lambda r: ",".join(r["primary"]) or "-"),
        ]) if result else "no node advertises or has approved routes"
    if command in ("routes.approve", "routes.unapprove"):
        return (f"node {result['id']} ({result['name']}): approved {','.join(result['approved']) or '-'}; "
                f"serving {','.join(result['served']) or '-'}; primary for {','.join(result['primary']) or '-'}")
    if command == "nodes.pending":
        return table(result, [("ID", "id"), ("HOSTNAME", "hostname"), ("REQUESTED", "requested")]) if result else (
            "no pending registrations"
        )
    if command == "replicas":
        return f"head: event {result['head']}\n" + table(result["replicas"], [
            ("NAME", "name"), ("URL", "url"), ("UP", lambda r: "yes" if r["up"] else "no"), ("LAG", "lag"),
            ("STREAMS", "streams"), ("SEEN", lambda r: f"{r['seen_ago_s']}s ago"),
        ])
    if command == "info":
        refused = ", ".join(f"{k} {v}" for k, v in result["Refused"].items() if k != "total") or "nothing"
        state = "running" if result["Running"] else "not running (counters are the running server's)"
        return (f"server key: {result['ServerKey']}\n(nodes pin it with: shoal up --login-server "
                f"{result['ServerURL']} --server-key {result['ServerKey']})\nserver: {state}\n"
                f"pending registrations: {result['Pending']}\nrefused: {result['Refused']['total']} ({refused})")
    if command == "keys.create":
        return (
            f"{result['key']}\n(shown once: it is stored hashed. prefix {result['prefix']}, "
            f"expires {result['expiration'] or 'never'})"
        )
    if command == "webhooks.list":
        return table(result, [
            ("ID", "id"), ("URL", "url"), ("EVENTS", lambda r: ",".join(r["events"])), ("CURSOR", "cursor"),
            ("BEHIND", "behind"),
            ("LAST", lambda r: f"{r['last']['outcome']} {r['last']['status'] or r['last']['error']}" if r["last"]
             else "-"),
        ]) if result else "no webhook endpoints"
    if command == "webhooks.rotate":
        return (f"{result['secret']}\n(endpoint {result['id']}: the new signing secret is shown once; the old one "
                f"signs nothing from now on)")
    if command == "webhooks.add":
        return (f"{result['secret']}\n(endpoint {result['id']}: the signing secret is shown once; it is kept in the "
                f"data dir's database, never in the event log)")
    if command == "webhooks.test":
        return f"endpoint {result['id']} answered {result['status'] or '-'}" + (
            f" ({result['error']})" if result["error"] else "")
    if command == "webhooks.deliveries":
        return table(result, [
            ("ENDPOINT", "endpoint"), ("EVENTS", lambda r: f"{r['first_seq']}-{r['last_seq']} ({r['events']})"),
            ("ATTEMPT", "attempt"), ("TIME", lambda r: _fmt_time(r["time"])), ("STATUS", lambda r: r["status"] or "-"),
            ("OUTCOME", "outcome"), ("ERROR", lambda r: r["error"] or "-"),
        ]) if result else "no deliveries"
    if command in ("tokens.create", "tokens.client"):
        return "\n".join(f"{k}: {v}" for k, v in result.items()) + "\n(shown once: it is stored hashed)"
    if command == "tokens.list":
        return table(result, [("ID", "id"), ("TYPE", "keyType"), ("USER", "userId"), ("EXPIRES", "expires"),
                              ("REVOKED", "revoked"), ("SCOPES", lambda r: ",".join(r["scopes"])),
                              ("DESCRIPTION", "description")]) if result else "no tokens"
    if command == "policy.get":
        return result["policy"] if result["policy"] is not None else "no policy set: all traffic is allowed"
    if command == "policy.diff":
        return str(result["text"])
    if command == "policy.history":
        return table(result, [("SEQ", "seq"), ("TIME", "time"), ("BY", "actor"),
                              ("SHA256", lambda r: (r["sha256"] or "(cleared)")[:16]), ("BYTES", "bytes")])
    if command == "policy.set":
        t = result["tests"]
        verb = "policy applied" if result["changed"] else "policy unchanged"
        return f"{verb} (sha256 {result['sha256'][:16]}); tests: {t['passed']} passed, {len(t['skipped'])} skipped"
    if command == "dns.get" or command == "dns.set":
        return render_dns(result)
    if command.startswith("dns.records."):
        rows = result["records"]
        return table(rows, [("NAME", "name"), ("TYPE", "type"), ("VALUE", "value"), ("SOURCE", "source")]) if rows \
            else "no extra records"
    if isinstance(result, dict):
        return "\n".join(f"{k}: {_fmt_time(v) if k in ('key_expiry', 'last_seen', 'created') else v}"
                         for k, v in result.items())
    return json.dumps(result, indent=2)


def render_dns(r: dict[str, Any]) -> str:
    lines = []
    if "changed" in r:
        lines.append("DNS settings changed" if r["changed"] else "DNS settings unchanged")
    lines += [
        f"base domain:        {r['base_domain']}" + (" (set by an admin)" if r.get("base_domain_source") == "admin"
                                                      else ""),
        f"MagicDNS:           {'on' if r['magic_dns'] else 'off'}",
        f"nameservers:        {', '.join(r['nameservers']) or '-'}",
        f"override local DNS: {'on' if r['override_local_dns'] else 'off'}",
        f"search domains:     {', '.join(r['search_domains']) or '-'}",
        "split DNS:          " + ("; ".join(f"{k} -> {', '.join(v)}" for k, v in r["split"].items()) or "-"),
        f"extra records:      {len(r['extra_records'])} (admin/config), {len(r['file_records'])} (file)",
    ]
    return "\n".join(lines)


def out(obj: Any, args: argparse.Namespace, text: str) -> None:
    print(json.dumps(obj) if args.json else text, flush=True)


# --- main -----------------------------------------------------------------------------------------------


def add_wg(config: Config, args: argparse.Namespace) -> int:
    """The key pair is made here; the server gets the public half only (coord/wgdevice.py)."""
    from coord import wgdevice

    png = Path(args.qr_png or f"{args.name}.png")
    if png.exists():
        raise CliError(f"{png} exists; give another --qr-png")
    private, public = wgdevice.keypair()
    result = run_admin(config, "devices.add-wg",
                       {"name": args.name, "user": args.user, "via": args.via, "public_key": public.hex()})
    try:
        text = wgdevice.config_text(private, result, args.endpoint)
    except ValueError as e:
        raise CliError(str(e)) from None
    wgdevice.write_png(text, png)
    if args.json:
        print(json.dumps({**result, "config": text, "qr_png": str(png)}, indent=2))
        return 0
    print(f"# device {result['name']} (node {result['id']}), carried by {result['hub_name']} (node {result['via']})")
    print("# the private key is shown once, here and in the QR code; the server does not have it")
    print(text)
    if not args.no_qr:
        print(wgdevice.qr_terminal(text))
    print(f"# QR code written to {png} (mode 0600)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name, default in (("config", None), ("data_dir", None), ("json", False)):
        if not hasattr(args, name):
            setattr(args, name, default)
    try:
        config = config_from(args)
        if args.group == "serve":
            from coord.serve import serve

            return serve(config)
        if args.group == "events":
            return asyncio.run(logcmd.events_cmd(config, args, lambda obj, text: out(obj, args, text)))
        if args.group == "info":
            # what the server holds (its key, limits, refusals), then what the data dir holds (keys, snapshots)
            live = run_admin(config, "info", {})
            return logcmd.info(config, lambda obj, text: out({**live, **obj}, args, f"{render('info', live)}\n{text}"))
        if args.group == "doctor":
            from coord import doctor

            rc, checks = asyncio.run(doctor.doctor(config))
            out([c.as_json() for c in checks], args, doctor.render(checks))
            return rc
        if args.group == "nodes" and args.cmd == "history":
            return asyncio.run(logcmd.node_history(config, args, lambda obj, text: out(obj, args, text)))
        if args.group == "policy" and args.cmd == "check":
            return policy_check(config, args)
        if args.group == "devices" and args.cmd == "add-wg":
            return add_wg(config, args)
        if args.group == "devices" and args.cmd == "revoke":
            result = run_admin(config, "nodes.delete", {"node": args.node})
            out(result, args, render("nodes.delete", result))
            return 0
        command, cmd_args = admin_request(args)
        result = run_admin(config, command, cmd_args)
        out(result, args, render(command, result))
        return 0
    except (CliError, CoordError) as e:
        sys.stderr.write(f"shoal-server: {e}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    raise SystemExit(main())
