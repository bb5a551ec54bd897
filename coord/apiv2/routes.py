"""The API v2 shell: Starlette routes over ``Service`` (writes) and the state (reads). docs/api.md lists them.

Each route: authenticate (creds.py) -> check the role or scope (access.py) -> parse the body (shapes.py) -> call
the same ``Service`` command the admin CLI calls, with the log actor ``api:<credential id>``. Errors are JSON
``{"message": ...}``: 401 bad credential, 403 naming the role or scope needed, 400 naming the field, 404, 409,
412 (If-Match). A write never takes a path of its own to the state.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from coord import decide, policy
from coord import events as ev
from coord.access import tailnet as access_tailnet
from coord.apiv2 import access, creds, shapes
from coord.apiv2.creds import OAuthToken, Principal
from coord.errors import DomainError, NotFound
from coord.service import Service
from coord.store import Filter

if TYPE_CHECKING:
    from coord.delivery import Webhooks

log = logging.getLogger("shoal.apiv2")

Handler = Callable[[Request, Principal], Awaitable[Response]]
# The policy served when none is set: what Shoal does without one (everyone reaches everyone).
DEFAULT_POLICY = '{\n  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]\n}\n'
MAX_BODY = 1 << 20


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(obj, status_code=status, headers=headers)


def _error(status: int, message: str) -> JSONResponse:
    return _json({"message": message}, status)


def etag_of(text: str) -> str:
    return '"' + hashlib.sha256(text.encode()).hexdigest() + '"'


@dataclass
class ApiV2:
    service: Service
    clock: Callable[[], float]
    key_expiry_s: float | None
    # Webhook endpoints: the same commands as ``shoal-server webhooks`` (None on PostgreSQL: not there yet).
    webhooks: Webhooks | None = None
    # OAuth access tokens: hash of the token text -> client and expiry (memory only: they live an hour).
    oauth: dict[str, OAuthToken] = field(default_factory=dict)
    # The device list is a pure function of the state: its encoded body, by fields=all, with the hash of the
    # last event folded (a new event, or a reload after a failed append, changes it).
    _devices_cache: dict[bool, tuple[str, bytes, bytes]] = field(default_factory=dict)
    _device_json: dict[bool, dict[int, tuple[tuple[Any, ...], bytes]]] = field(default_factory=dict)
    # Endpoint id -> (time added, who added it, time last changed), from the log (``_created_times``).
    _created: dict[str, tuple[str, str, str]] = field(default_factory=dict)

    @property
    def hashes(self) -> dict[str, str]:
        return self.service.credential_hashes

    @property
    def state(self) -> Any:
        return self.service.state

    # --- plumbing -----------------------------------------------------------------------------------------

    def guard(self, area: str, write: bool, fn: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                tailnet = request.path_params.get("tailnet")
                if tailnet is not None and tailnet != "-":
                    return _error(404, f"tailnet {tailnet!r} not found: use '-' for this tailnet")
                p = creds.authenticate(request.headers.get("authorization"), self.state, self.hashes, self.oauth,
                                       self.clock())
                access.check(p, area, write)
                return await fn(request, p)
            except creds.Unauthorized as e:
                return _error(401, str(e))
            except access.Forbidden as e:
                return _error(403, str(e))
            except shapes.BadField as e:
                return _error(400, str(e))
            except DomainError as e:
                return _error(e.status, e.message)
            except Exception:
                log.exception("API v2 %s %s failed", request.method, request.url.path)
                return _error(500, "internal error")
        return endpoint

    async def body(self, request: Request) -> bytes:
        data = await request.body()
        if len(data) > MAX_BODY:
            raise shapes.BadField("body", f"larger than {MAX_BODY} bytes")
        return data

    async def obj(self, request: Request) -> dict[str, Any]:
        return shapes.parse_json(await self.body(request))

    def node(self, request: Request) -> str:
        ref = shapes.device_ref(str(request.path_params["device"]))
        decide.find_node(self.state, ref)  # 404 when there is none
        return ref

    # --- devices ------------------------------------------------------------------------------------------

    def _fields(self, request: Request) -> bool:
        f = request.query_params.get("fields", "default")
        if f not in ("default", "all"):
            raise shapes.BadField("fields", "expected default or all")
        return f == "all"

    async def devices(self, request: Request, p: Principal) -> Response:
        all_fields, st = self._fields(request), self.state
        cached = self._devices_cache.get(all_fields)
        if cached is None or cached[0] != st.last_hash:
            body = self._device_list(all_fields)
            cached = self._devices_cache[all_fields] = (st.last_hash, body, gzip.compress(body, 1, mtime=0))
        if "gzip" in request.headers.get("accept-encoding", ""):
            # Compressed once per state, not per request: a 2,000-device list is ~1.7 MB of JSON, ~10x less.
            return Response(cached[2], media_type="application/json",
                            headers={"Content-Encoding": "gzip", "Vary": "Accept-Encoding"})
        return Response(cached[1], media_type="application/json", headers={"Vary": "Accept-Encoding"})

    def _device_list(self, all_fields: bool) -> bytes:
        """The encoded list; each device's JSON is kept by what it is made of, so an event re-encodes only the
        devices it changed (a 2,000-node list after one endpoint change costs the keys, not 2,000 encodings)."""
        st, domain = self.state, self.service.builder.domain
        old = self._device_json.get(all_fields, {})
        new: dict[int, tuple[tuple[Any, ...], bytes]] = {}
        parts = []
        for nid in sorted(st.nodes):
            n = st.nodes[nid]
            u = st.users.get(n.user_id) if n.user_id is not None else None
            key = (n.given_name, n.hostname, n.os, n.last_seen, n.key_expiry, n.online, n.tags, n.routes,
                   n.approved_routes, n.endpoints, u.name if u else "", n.node_key, n.ephemeral, n.ipv4, n.ipv6,
                   n.machine_key, n.created, domain)
            hit = old.get(nid)
            if hit is None or hit[0] != key:
                hit = (key, json.dumps(shapes.device(st, n, domain, all_fields=all_fields),
                                       separators=(",", ":")).encode())
            new[nid] = hit
            parts.append(hit[1])
        self._device_json[all_fields] = new
        return b'{"devices":[' + b",".join(parts) + b"]}"

    async def device(self, request: Request, p: Principal) -> Response:
        n = self.state.nodes[int(self.node(request))]
        return _json(shapes.device(self.state, n, self.service.builder.domain, all_fields=self._fields(request)))

    async def delete_device(self, request: Request, p: Principal) -> Response:
        await self.service.delete_node(self.node(request), actor=p.actor)
        return _json({})

    async def authorize(self, request: Request, p: Principal) -> Response:
        # Every device in the tailnet is authorized: approval happens before a node exists (nodes approve).
        self.node(request)
        if not shapes.get_bool(await self.obj(request), "authorized"):
            raise shapes.BadField("authorized", "Shoal cannot deauthorize a device: expire its key or delete it")
        return _json({})

    async def expire(self, request: Request, p: Principal) -> Response:
        await self.service.expire_node(self.node(request), actor=p.actor)
        return _json({})

    async def key_expiry(self, request: Request, p: Principal) -> Response:
        ref = self.node(request)
        disabled = shapes.get_bool(await self.obj(request), "keyExpiryDisabled")
        expiry = None if disabled else self.clock() + (self.key_expiry_s or 180 * 86400.0)
        await self.service.set_node_expiry(ref, expiry, actor=p.actor)
        return _json({})

    async def rename(self, request: Request, p: Principal) -> Response:
        ref = self.node(request)
        name = shapes.get_str(await self.obj(request), "name", limit=253)
        n = self.state.nodes[int(ref)]
        # Tailscale takes the short name or the full one; "" resets to the OS hostname.
        name = name.removesuffix("." + self.service.builder.domain) or n.hostname.lower()
        await self.service.rename_node(ref, name, actor=p.actor)
        return _json({})

    async def tags(self, request: Request, p: Principal) -> Response:
        ref = self.node(request)
        tags = shapes.get_strs(await self.obj(request), "tags")
        await self.service.tag_node(ref, tuple(tags), actor=p.actor)
        return _json({})

    async def routes_get(self, request: Request, p: Principal) -> Response:
        return _json(shapes.device_routes(self.state.nodes[int(self.node(request))]))

    async def routes_set(self, request: Request, p: Principal) -> Response:
        ref = self.node(request)
        want = shapes.get_strs(await self.obj(request), "routes")
        n = self.state.nodes[int(ref)]
        drop = tuple(r for r in n.approved_routes if r not in want)
        add = tuple(r for r in want if r not in n.approved_routes)
        if add:
            await self.service.approve_routes(ref, add, actor=p.actor)
        if drop:
            await self.service.unapprove_routes(ref, drop, actor=p.actor)
        return _json(shapes.device_routes(self.state.nodes[int(ref)]))

    # --- keys ---------------------------------------------------------------------------------------------

    async def keys(self, request: Request, p: Principal) -> Response:
        st, now = self.state, self.clock()
        out = [shapes.auth_key(st, k, now) for k in sorted(st.keys.values(), key=lambda k: k.id)]
        out += [shapes.credential(i, c, now) for i, c in sorted(st.credentials.items())]
        return _json({"keys": out})

    def _find_key(self, ref: str) -> dict[str, Any]:
        st, now = self.state, self.clock()
        if ref in st.credentials:
            return shapes.credential(ref, st.credentials[ref], now)
        kid = st.keys_by_prefix.get(ref)
        if kid is None:
            raise NotFound(f"no key {ref!r}")
        return shapes.auth_key(st, st.keys[kid], now)

    async def key(self, request: Request, p: Principal) -> Response:
        return _json(self._find_key(str(request.path_params["key"])))

    async def delete_key(self, request: Request, p: Principal) -> Response:
        ref = str(request.path_params["key"])
        self._find_key(ref)
        if ref in self.state.credentials:
            await self.service.revoke_credential(ref, actor=p.actor)
        elif not self.state.keys[self.state.keys_by_prefix[ref]].revoked:
            await self.service.revoke_key(ref, actor=p.actor)
        return _json({})

    async def create_key(self, request: Request, p: Principal) -> Response:
        body = await self.obj(request)
        kind = shapes.get_str(body, "keyType", default="auth")
        description = shapes.get_str(body, "description", default="", limit=100)
        if kind == "auth":
            return await self._create_auth_key(body, p)
        if kind in ("api", "client"):
            return await self._create_credential(kind, body, description, p)
        raise shapes.BadField("keyType", "expected auth, api or client")

    async def _create_auth_key(self, body: dict[str, Any], p: Principal) -> Response:
        seconds = shapes.get_int(body, "expirySeconds", default=86400, low=0, high=365 * 86400)
        create = shapes.get_obj(shapes.get_obj(shapes.get_obj(body, "capabilities"), "devices"), "create")
        reusable = bool(shapes.get_bool(create, "reusable", required=False))
        ephemeral = bool(shapes.get_bool(create, "ephemeral", required=False))
        shapes.get_bool(create, "preauthorized", required=False)
        tags = shapes.get_strs(create, "tags", default=[])
        if p.is_client:
            if not tags:
                raise shapes.BadField("capabilities.devices.create.tags",
                                      "an auth key created by an OAuth client must have tags")
            extra = [t for t in tags if p.tags and t not in p.tags]
            if extra:
                raise access.Forbidden(f"this OAuth client may not create keys with {', '.join(extra)}")
        user = self.state.users.get(p.user_id)
        if user is None:
            raise NotFound("the credential's user no longer exists")
        out = await self.service.create_key(
            str(user.id), reusable=reusable, ephemeral=ephemeral, expiration=float(seconds or 86400),
            tags=tuple(tags), actor=p.actor,
        )
        st = self.state
        d = shapes.auth_key(st, st.keys[out["id"]], self.clock())
        d["key"] = out["key"]
        return _json(d)

    async def _create_credential(self, kind: str, body: dict[str, Any], description: str,
                                 p: Principal) -> Response:
        if p.is_client:
            raise access.Forbidden(f"an OAuth client cannot create {kind} keys; use an API access token")
        scopes: list[str] = []
        tags: list[str] = []
        if kind == "client":
            scopes = shapes.get_strs(body, "scopes", default=[])
            if not scopes:
                raise shapes.BadField("scopes", "an OAuth client needs at least one scope")
            bad = [s for s in scopes if s not in access.ALL_SCOPES]
            if bad:
                raise shapes.BadField("scopes", f"unknown scope {bad[0]!r}")
            tags = shapes.get_strs(body, "tags", default=[])
            expires = None
        else:
            days = shapes.get_int(body, "expirySeconds", default=90 * 86400, low=60, high=365 * 86400)
            expires = self.clock() + days
        cred_id, secret = await self.service.create_credential(
            kind, p.user_id, description=description, expires=expires, scopes=tuple(scopes), tags=tuple(tags),
            actor=p.actor,
        )
        text = creds.api_token_text(cred_id, secret) if kind == "api" else creds.client_secret_text(cred_id, secret)
        d = shapes.credential(cred_id, self.state.credentials[cred_id], self.clock())
        d["key"] = text
        return _json(d)

    async def oauth_token(self, request: Request) -> Response:
        """Client credentials: a form with client_id and client_secret (grant_type optional)."""
        try:
            form = parse_qs((await self.body(request)).decode(), keep_blank_values=True)
        except (UnicodeDecodeError, shapes.BadField):
            return _error(400, "body: expected a form")
        cid = (form.get("client_id") or [""])[0]
        secret_text = (form.get("client_secret") or [""])[0]
        grant = (form.get("grant_type") or ["client_credentials"])[0]
        if grant != "client_credentials":
            return _error(400, "grant_type: only client_credentials")
        parts = creds.split_text(secret_text, creds.CLIENT_PREFIX)
        now = self.clock()
        try:
            if parts is None or parts[0] != cid:
                raise creds.Unauthorized("client_id or client_secret invalid")
            creds.check_secret(self.state, self.hashes, cid, parts[1], "client", now)
        except creds.Unauthorized as e:
            return _error(401, str(e))
        for k in [k for k, t in self.oauth.items() if now >= t.expires]:
            del self.oauth[k]
        token = creds.OAUTH_PREFIX + secrets.token_hex(32)
        self.oauth[creds.hash_secret(token)] = OAuthToken(cid, now + creds.OAUTH_TOKEN_LIFETIME)
        scopes = " ".join(self.state.credentials[cid]["scopes"])
        return _json({"access_token": token, "token_type": "Bearer",
                      "expires_in": int(creds.OAUTH_TOKEN_LIFETIME), "scope": scopes})

    # --- policy -------------------------------------------------------------------------------------------

    def _policy_text(self) -> str:
        return self.state.policy_text or DEFAULT_POLICY

    def _policy_response(self, request: Request) -> Response:
        text = self._policy_text()
        headers = {"ETag": etag_of(text)}
        if "hujson" in request.headers.get("accept", ""):
            return Response(text, media_type="application/hujson", headers=headers)
        try:
            obj: Any = policy.parse(text).raw
        except policy.PolicyError:
            obj = {}
        return _json(obj, headers=headers)

    async def acl_get(self, request: Request, p: Principal) -> Response:
        return self._policy_response(request)

    async def acl_set(self, request: Request, p: Principal) -> Response:
        text = (await self.body(request)).decode("utf-8", "replace")
        want = request.headers.get("if-match")
        if want is not None and want.strip() not in ("*", etag_of(self._policy_text())):
            return _error(412, "If-Match: the policy file changed since that ETag; fetch it again")
        await self.service.set_policy(text, actor=p.actor)
        return self._policy_response(request)

    async def acl_validate(self, request: Request, p: Principal) -> Response:
        text = (await self.body(request)).decode("utf-8", "replace")
        result = self.service.check_policy(text, "policy.hujson")
        if result["ok"]:
            return Response(b"", media_type="application/json")
        data = [{"user": str(f.get("src", "")), "errors": [f"{f.get('src')} -> {f.get('dst')}: expected "
                                                           f"{f.get('expected')}"]} for f in result["failed"]]
        return _json({"message": "; ".join(result["errors"]) or "test(s) failed", "data": data})

    async def acl_preview(self, request: Request, p: Principal) -> Response:
        kind = request.query_params.get("type", "")
        who = request.query_params.get("previewFor", "")
        if kind not in ("user", "ipport"):
            raise shapes.BadField("type", "expected user or ipport")
        if not who:
            raise shapes.BadField("previewFor", "required: a user's login name" if kind == "user"
                                  else "required: IP:port (e.g. 100.64.0.1:22, [fd7a:115c:a1e0::1]:22)")
        text = (await self.body(request)).decode("utf-8", "replace")
        try:
            parsed = policy.parse(text)
        except policy.PolicyError as e:
            raise shapes.BadField("body", str(e)) from None
        if kind == "ipport":
            return _json({"type": kind, "previewFor": who, "matches": self._preview_ipport(parsed, who)})
        u = self.state.user_by_name(who)
        mine = {who, "*", "autogroup:member"} | ({f"autogroup:{u.role}"} if u else set())
        mine |= {g for g, members in parsed.groups.items() if who in members}
        matches = []
        for entry in parsed.acls:
            if entry.action == "accept" and mine & set(entry.src):
                matches.append({"users": list(entry.src), "ports": list(entry.dst), "lineNumber": 0})
        for g in parsed.grants:
            if mine & set(g.src):
                matches.append({"users": list(g.src), "ports": [f"{d}:{','.join(g.ip) or '*'}" for d in g.dst],
                                "lineNumber": 0})
        return _json({"type": kind, "previewFor": who, "matches": matches})

    def _preview_ipport(self, parsed: Any, who: str) -> list[dict[str, Any]]:
        """Each rule through which something reaches IP:port, as written in the file (src, and dst with ports)."""
        host, sep, port_text = who.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise shapes.BadField("previewFor", f"{who!r} is not IP:port (a port from 1 to 65535)")
        try:
            rules = policy.rules_to(parsed, host, int(port_text), access_tailnet(self.state))
        except ValueError as e:
            raise shapes.BadField("previewFor", str(e)) from None
        out = []
        for r in rules:
            section, i = r.origin[0], r.origin[1]
            raw = parsed.raw.get(section, [])[i] if isinstance(i, int) else {}
            src = [str(x) for x in raw.get("src", [])]
            if section == "grants":
                ips = ",".join(str(x) for x in raw.get("ip", [])) or "*"
                ports = [f"{d}:{ips}" for d in raw.get("dst", [])]
            else:
                ports = [str(x) for x in raw.get("dst", [])]
            out.append({"users": src, "ports": ports, "lineNumber": 0})
        return out

    # --- DNS ----------------------------------------------------------------------------------------------

    async def nameservers(self, request: Request, p: Principal) -> Response:
        d = self.state.dns
        if request.method == "POST":
            ns = shapes.get_strs(await self.obj(request), "dns")
            await self.service.set_dns(nameservers=ns, actor=p.actor)
            d = self.state.dns
        return _json({"dns": list(d.nameservers), "magicDNS": d.magic_dns})

    async def searchpaths(self, request: Request, p: Principal) -> Response:
        if request.method == "POST":
            paths = shapes.get_strs(await self.obj(request), "searchPaths")
            await self.service.set_dns(search_domains=paths, actor=p.actor)
        return _json({"searchPaths": list(self.state.dns.search_domains)})

    async def preferences(self, request: Request, p: Principal) -> Response:
        if request.method == "POST":
            on = shapes.get_bool(await self.obj(request), "magicDNS")
            await self.service.set_dns(magic_dns=on, actor=p.actor)
        return _json({"magicDNS": self.state.dns.magic_dns})

    def _split(self) -> dict[str, list[str]]:
        return {name: list(addrs) for name, addrs in self.state.dns.split}

    async def split_dns(self, request: Request, p: Principal) -> Response:
        if request.method in ("PUT", "PATCH"):
            body = await self.obj(request)
            split: dict[str, list[str]] = {}
            for suffix, addrs in body.items():
                if addrs is None:
                    addrs = []
                split[suffix] = shapes.get_strs(addrs, suffix)
            if request.method == "PATCH":
                current = {k.rstrip("."): v for k, v in self._split().items()}
                split = {k: v for k, v in split.items() if v or k.rstrip(".") in current}
                await self.service.set_dns(split=split, actor=p.actor)
            else:
                await self.service.set_dns(split={k: v for k, v in split.items() if v}, clear_split=True,
                                           actor=p.actor)
        return _json(self._split())

    # --- users, settings, logs ----------------------------------------------------------------------------

    async def users(self, request: Request, p: Principal) -> Response:
        kind = request.query_params.get("type")
        role = request.query_params.get("role")
        if kind not in (None, "member", "all"):
            return _json({"users": []})
        st = self.state
        return _json({"users": [shapes.user(st, u) for u in sorted(st.users.values(), key=lambda u: u.id)
                                if role is None or u.role == role]})

    def _user(self, request: Request) -> Any:
        ref = str(request.path_params["user"])
        if not ref.isdigit():
            raise shapes.BadField("userId", f"{ref!r} is not a user id")
        return decide.find_user(self.state, ref)

    async def user(self, request: Request, p: Principal) -> Response:
        return _json(shapes.user(self.state, self._user(request)))

    async def user_role(self, request: Request, p: Principal) -> Response:
        u = self._user(request)
        role = shapes.get_str(await self.obj(request), "role")
        if role not in decide.ROLES:
            raise shapes.BadField("role", f"expected one of {', '.join(decide.ROLES)}")
        if role == "owner" or u.role == "owner":
            raise access.Forbidden("the owner is set only from the CLI: shoal-server users role USER ROLE")
        if u.id == p.user_id:
            raise access.Forbidden("you cannot change your own role")
        await self.service.set_role(str(u.id), role, actor=p.actor)
        return _json(shapes.user(self.state, self.state.users[u.id]))

    def _settings(self) -> dict[str, Any]:
        days = 0 if not self.key_expiry_s else int(self.key_expiry_s // 86400)
        return {
            "devicesApprovalOn": False, "devicesAutoUpdatesOn": False, "devicesKeyDurationDays": days,
            "usersApprovalOn": False, "usersRoleAllowedToJoinExternalTailnets": "none",
            "networkFlowLoggingOn": False, "regionalRoutingOn": False, "postureIdentityCollectionOn": False,
            "httpsEnabled": False, "aclsExternallyManagedOn": False, "aclsExternalLink": "",
        }

    async def settings(self, request: Request, p: Principal) -> Response:
        current = self._settings()
        if request.method == "PATCH":
            body = await self.obj(request)
            for k, v in body.items():
                if k not in current:
                    raise shapes.BadField(k, "not a tailnet setting")
                if v != current[k]:
                    raise shapes.BadField(k, f"Shoal keeps this at {current[k]!r} (set key expiry in the config)")
        return _json(current)

    async def audit(self, request: Request, p: Principal) -> Response:
        q = request.query_params
        start, end = q.get("start"), q.get("end")
        if not start:
            raise shapes.BadField("start", "required: RFC 3339 time")
        if not end:
            raise shapes.BadField("end", "required: RFC 3339 time")
        try:
            since, until = policy_time(start), policy_time(end)
        except ValueError as e:
            raise shapes.BadField("start/end", str(e)) from None
        wanted = set(q.getlist("event"))
        actors, targets = q.getlist("actor"), [t.casefold() for t in q.getlist("target") if t]
        logs = []
        async for r in self.service.store.read(Filter(since_time=since, until_time=until)):
            if r.event.type in shapes.NOT_CONFIG:
                continue
            entry = shapes.audit_entry(r)
            if wanted and r.event.type not in wanted and entry["action"] not in wanted:
                continue
            if actors and not any(self._actor_is(r.actor, a) for a in actors):
                continue
            if targets and not self._target_is(entry["target"], targets):
                continue
            logs.append(entry)
            if len(logs) >= 10_000:
                break
        return _json({"version": "1.1", "tailnetId": "-", "logs": logs})

    # --- webhooks -----------------------------------------------------------------------------------------

    def _hooks(self) -> Webhooks:
        if self.webhooks is None:
            raise DomainError("webhooks are not available on PostgreSQL yet (docs/ha.md)")
        return self.webhooks

    def _webhook(self, view: dict[str, Any]) -> dict[str, Any]:
        return shapes.webhook(view, self._created.get(view["id"]))

    async def _created_times(self) -> None:
        """When each endpoint was added, by whom, and last changed (its Added and Updated events in the log)."""
        seen: dict[str, tuple[str, str, str]] = {}
        async for r in self.service.store.read(Filter(types=("WebhookEndpointAdded", "WebhookEndpointUpdated"))):
            e = r.event
            if isinstance(e, ev.WebhookEndpointAdded) and e.endpoint_id in self.state.webhooks:
                seen[e.endpoint_id] = (r.time, self._login_of(r.actor), r.time)
            elif isinstance(e, ev.WebhookEndpointUpdated) and e.endpoint_id in seen:
                at, by, _ = seen[e.endpoint_id]
                seen[e.endpoint_id] = (at, by, r.time)
        self._created = seen

    def _login_of(self, actor: str) -> str:
        if actor.startswith("api:"):
            c = self.state.credentials.get(actor.removeprefix("api:"))
            u = self.state.users.get(c["user_id"]) if c else None
            if u is not None:
                return str(u.name)
        return actor

    async def webhooks_list(self, request: Request, p: Principal) -> Response:
        hooks = await self._hooks().endpoints()
        await self._created_times()
        return _json({"webhooks": [self._webhook(v) for v in hooks]})

    async def webhook_create(self, request: Request, p: Principal) -> Response:
        body = await self.obj(request)
        url = shapes.get_str(body, "endpointUrl", limit=2048)
        provider = shapes.get_str(body, "providerType", default="", limit=32)
        if provider not in ("", "generic"):
            raise shapes.BadField("providerType", "Shoal sends Tailscale's own format only: omit it or use ''")
        subs = shapes.get_strs(body, "subscriptions")
        if not subs:
            raise shapes.BadField("subscriptions", "at least one event type")
        try:
            made = await self._hooks().add(url, subs, actor=p.actor)
        except NotFound:
            raise
        except DomainError as e:
            field_name = "endpointUrl" if e.message.startswith("url") else "subscriptions"
            raise shapes.BadField(field_name, e.message) from None
        await self._created_times()
        return _json(self._webhook(made) | {"secret": made["secret"]})

    def _eid(self, request: Request) -> str:
        return str(request.path_params["endpoint"])

    async def webhook_get(self, request: Request, p: Principal) -> Response:
        v = await self._hooks().endpoint(self._eid(request))
        await self._created_times()
        return _json(self._webhook(v))

    async def webhook_patch(self, request: Request, p: Principal) -> Response:
        hooks, eid = self._hooks(), self._eid(request)
        await hooks.endpoint(eid)  # 404 before looking at the body
        subs = shapes.get_strs(await self.obj(request), "subscriptions")
        try:
            v = await hooks.update(eid, subs, actor=p.actor)
        except NotFound:
            raise
        except DomainError as e:
            raise shapes.BadField("subscriptions", e.message) from None
        await self._created_times()
        return _json(self._webhook(v))

    async def webhook_delete(self, request: Request, p: Principal) -> Response:
        await self._hooks().remove(self._eid(request), actor=p.actor)
        return _json({})

    async def webhook_test(self, request: Request, p: Principal) -> Response:
        # Tailscale queues the test event and answers 202; Shoal posts it before answering (the outcome is in
        # the log line and in `shoal-server webhooks test`), and still answers 202 whatever the endpoint said.
        out = await self._hooks().test(self._eid(request))
        if not out["ok"]:
            log.info("webhook %s test: %s", out["id"], out["error"] or out["status"])
        return Response(b"", status_code=202)

    async def webhook_rotate(self, request: Request, p: Principal) -> Response:
        v = await self._hooks().rotate(self._eid(request))
        await self._created_times()
        return _json(self._webhook(v) | {"secret": v["secret"]})

    def _actor_names(self, actor: str) -> list[str]:
        """What an actor filter may match: the log's actor, its id part, and for a credential its user's login."""
        kind, _, ident = actor.partition(":")
        login = self._login_of(actor) if kind == "api" else ""
        return _names(actor, ident, login)

    def _actor_is(self, actor: str, want: str) -> bool:
        """Tailscale's ``actor``: an id (exact), or ``~part`` of a login or display name."""
        names = self._actor_names(actor)
        if want.startswith("~"):
            part = want[1:].casefold()
            return bool(part) and any(part in n for n in names)
        return want.casefold() in names

    def _target_is(self, target: dict[str, Any], wants: list[str]) -> bool:
        """Tailscale's ``target``: any part of the target's id or name (a node's or user's current name)."""
        tid, name = str(target["id"]), ""
        if target["type"] == "NODE" and tid.isdigit() and int(tid) in self.state.nodes:
            name = self.state.nodes[int(tid)].given_name
        elif target["type"] == "USER" and tid.isdigit() and int(tid) in self.state.users:
            name = self.state.users[int(tid)].name
        names = _names(tid, name, str(target["property"]))
        return any(w in n for w in wants for n in names)

    # --- the table ----------------------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        g = self.guard
        t = "/tailnet/{tailnet}"
        d = "/device/{device}"
        w = "/webhooks/{endpoint}"
        return [Mount("/api/v2", routes=[
            Route("/oauth/token", self.oauth_token, methods=["POST"]),
            Route(f"{t}/devices", g("devices", False, self.devices), methods=["GET"]),
            Route(d, g("devices", False, self.device), methods=["GET"]),
            Route(d, g("devices", True, self.delete_device), methods=["DELETE"]),
            Route(f"{d}/authorized", g("devices", True, self.authorize), methods=["POST"]),
            Route(f"{d}/expire", g("devices", True, self.expire), methods=["POST"]),
            Route(f"{d}/key", g("devices", True, self.key_expiry), methods=["POST"]),
            Route(f"{d}/name", g("devices", True, self.rename), methods=["POST"]),
            Route(f"{d}/tags", g("devices", True, self.tags), methods=["POST"]),
            Route(f"{d}/routes", g("routes", False, self.routes_get), methods=["GET"]),
            Route(f"{d}/routes", g("routes", True, self.routes_set), methods=["POST"]),
            Route(f"{t}/keys", g("keys", False, self.keys), methods=["GET"]),
            Route(f"{t}/keys", g("keys", True, self.create_key), methods=["POST"]),
            Route(f"{t}/keys/{{key}}", g("keys", False, self.key), methods=["GET"]),
            Route(f"{t}/keys/{{key}}", g("keys", True, self.delete_key), methods=["DELETE"]),
            Route(f"{t}/acl", g("policy", False, self.acl_get), methods=["GET"]),
            Route(f"{t}/acl", g("policy", True, self.acl_set), methods=["POST"]),
            Route(f"{t}/acl/validate", g("policy", False, self.acl_validate), methods=["POST"]),
            Route(f"{t}/acl/preview", g("policy", False, self.acl_preview), methods=["POST"]),
            Route(f"{t}/dns/nameservers", g("dns", False, self.nameservers), methods=["GET"]),
            Route(f"{t}/dns/nameservers", g("dns", True, self.nameservers), methods=["POST"]),
            Route(f"{t}/dns/searchpaths", g("dns", False, self.searchpaths), methods=["GET"]),
            Route(f"{t}/dns/searchpaths", g("dns", True, self.searchpaths), methods=["POST"]),
            Route(f"{t}/dns/preferences", g("dns", False, self.preferences), methods=["GET"]),
            Route(f"{t}/dns/preferences", g("dns", True, self.preferences), methods=["POST"]),
            Route(f"{t}/dns/split-dns", g("dns", False, self.split_dns), methods=["GET"]),
            Route(f"{t}/dns/split-dns", g("dns", True, self.split_dns), methods=["PUT", "PATCH"]),
            Route(f"{t}/users", g("users", False, self.users), methods=["GET"]),
            Route("/users/{user}", g("users", False, self.user), methods=["GET"]),
            Route("/users/{user}/role", g("roles", True, self.user_role), methods=["POST"]),
            Route(f"{t}/settings", g("settings", False, self.settings), methods=["GET"]),
            Route(f"{t}/settings", g("settings", True, self.settings), methods=["PATCH"]),
            Route(f"{t}/logging/configuration", g("logs", False, self.audit), methods=["GET"]),
            Route(f"{t}/webhooks", g("webhooks", False, self.webhooks_list), methods=["GET"]),
            Route(f"{t}/webhooks", g("webhooks", True, self.webhook_create), methods=["POST"]),
            Route(w, g("webhooks", False, self.webhook_get), methods=["GET"]),
            Route(w, g("webhooks", True, self.webhook_patch), methods=["PATCH"]),
            Route(w, g("webhooks", True, self.webhook_delete), methods=["DELETE"]),
            Route(f"{w}/test", g("webhooks", True, self.webhook_test), methods=["POST"]),
            Route(f"{w}/rotate", g("webhooks", True, self.webhook_rotate), methods=["POST"]),
        ])]


def _names(*texts: str) -> list[str]:
    return [t.casefold() for t in texts if t]


def policy_time(text: str) -> str:
    """An RFC 3339 time (any offset) as the log writes times, for comparing with event times."""
    t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return ev.rfc3339(t.timestamp())
