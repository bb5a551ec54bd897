"""Validate a HuJSON policy document into a typed `Policy`.

Every error is a `PolicyError` naming the JSON path (`acls[3].dst[1]`), its line and column, and what was
expected. As in Tailscale, unknown keys, wrong types, undefined groups, tags, hosts and ipsets, and
malformed ports, protocols and addresses are refused.

Selector grammar (hs `parseAlias` order): IP or CIDR, `*`, user (contains `@`), `group:`, `tag:`,
`autogroup:`, `ipset:`, `svc:`, else a `hosts` name. Destinations of `acls` are `alias:ports` (split on
the last colon; IPv6 may be bracketed, `[fd7a::1]:22`); ports are `*`, `22`, `80,443`, `1000-2000`.
Grant `ip` entries are `*`, `ports` or `proto:ports`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any

from .hujson import Doc, Path, load
from .model import (
    ALL_PORTS,
    AUTOGROUPS,
    DST_ONLY,
    LOCAL_USER,
    PROTOCOLS,
    ROLE_AUTOGROUPS,
    SRC_ONLY,
    SSH_ONLY,
    AclEntry,
    AutoApprovers,
    Dst,
    Grant,
    IPNet,
    NodeAttr,
    Policy,
    PortRange,
    Rule,
    Sel,
    SshRule,
    SshTest,
    Test,
)

TOP_KEYS = {
    "acls",
    "grants",
    "groups",
    "hosts",
    "ipsets",
    "tagOwners",
    "autoApprovers",
    "ssh",
    "sshTests",
    "nodeAttrs",
    "postures",
    "tests",
    "derpMap",
    "disableIPv4",
    "randomizeClientPort",
    "OneCGNATRoute",
    "defaultSrcPosture",
    "attrConfig",
}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
POSTURE_EXPR = re.compile(r"\s*(?P<attr>[A-Za-z][\w:.\-]*)\s*(?P<op>==|!=|<=|>=|<|>|NOT IN|IN)\s*(?P<val>.+?)\s*$")


def parse(text: str | bytes, filename: str = "policy.hujson") -> Policy:
    """Parse and validate a policy file; raises PolicyError."""
    doc = load(text, filename)
    return _Parser(doc).policy()


def parse_ports(text: str) -> tuple[PortRange, ...] | None:
    """`*`, `22`, `80,443`, `1000-2000` -> ranges; None if malformed."""
    if text == "*":
        return ALL_PORTS
    out: list[PortRange] = []
    for part in text.split(","):
        m = re.fullmatch(r"(\d{1,5})(?:-(\d{1,5}))?", part.strip())
        if not m:
            return None
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) else first
        if last > 65535 or first > last:
            return None
        out.append((first, last))
    return tuple(out) if out else None


def parse_proto(text: str) -> int | None:
    """IANA name or decimal 0-255 without leading zeros; None if unknown."""
    t = text.strip().lower()
    if t in PROTOCOLS:
        return PROTOCOLS[t]
    if re.fullmatch(r"0|[1-9]\d{0,2}", t) and int(t) <= 255:
        return int(t)
    return None


def split_alias_ports(text: str) -> tuple[str, str] | None:
    """`alias:ports` -> (alias, ports), IPv6 bracketed or bare; None if there is no port part."""
    if text.startswith("["):
        m = re.fullmatch(r"\[([^\]]+)\](?:/(\d+))?:(.+)", text)
        if not m:
            return None
        alias = m.group(1) + (f"/{m.group(2)}" if m.group(2) else "")
        return alias, m.group(3)
    if ":" not in text:
        return None
    alias, ports = text.rsplit(":", 1)
    return alias, ports


def ip_net(text: str) -> IPNet | None:
    try:
        return ipaddress.ip_network(text, strict=False) if "/" in text else ipaddress.ip_network(text)
    except ValueError:
        return None


class _Parser:
    def __init__(self, doc: Doc) -> None:
        self.doc = doc
        self.err = doc.error
        self.groups: dict[str, tuple[str, ...]] = {}
        self.tags: set[str] = set()
        self.hosts: dict[str, IPNet] = {}
        self.ipsets: dict[str, tuple[IPNet, ...]] = {}
        self.postures: dict[str, tuple[str, ...]] = {}

    # -- shape helpers -------------------------------------------------------------------------------

    def obj(self, v: Any, path: Path, allowed: set[str], required: tuple[str, ...] = ()) -> dict[str, Any]:
        if not isinstance(v, dict):
            raise self.err(path, f"expected an object, got {_kind(v)}")
        for k in v:
            if k not in allowed:
                raise self.err(
                    (*path, k), f"unknown key {k!r}; expected one of {', '.join(sorted(allowed))}", at_key=True
                )
        for k in required:
            if k not in v:
                raise self.err(path, f"missing required key {k!r}")
        return v

    def string(self, v: Any, path: Path, *, empty: bool = False) -> str:
        if not isinstance(v, str):
            raise self.err(path, f"expected a string, got {_kind(v)}")
        if not empty and not v.strip():
            raise self.err(path, "expected a non-empty string")
        return v

    def strings(self, v: Any, path: Path) -> tuple[str, ...]:
        if not isinstance(v, list):
            raise self.err(path, f"expected an array of strings, got {_kind(v)}")
        return tuple(self.string(x, (*path, i)) for i, x in enumerate(v))

    def boolean(self, v: Any, path: Path) -> bool:
        if not isinstance(v, bool):
            raise self.err(path, f"expected true or false, got {_kind(v)}")
        return v

    def mapping(self, v: Any, path: Path) -> dict[str, Any]:
        if not isinstance(v, dict):
            raise self.err(path, f"expected an object, got {_kind(v)}")
        return v

    # -- selectors -------------------------------------------------------------------------------------

    def sel(self, text: str, path: Path, role: str) -> Sel:
        """role: src, dst, owner (tagOwners/autoApprovers), target (nodeAttrs), test, ssh-src, ssh-dst."""
        t = text.strip()
        net = ip_net(t)
        if net is not None:
            if role == "owner":
                raise self.err(path, f"{t!r}: expected a user, group, tag or autogroup, not an address")
            return Sel("prefix", t, (net,))
        if t == "*":
            if role in ("owner",):
                raise self.err(path, "'*' is not allowed here; expected a user, group, tag or autogroup")
            return Sel("all", "*")
        if "@" in t:
            if any(c.isspace() for c in t) or t.startswith("@"):
                raise self.err(path, f"{t!r} is not a valid user login")
            return Sel("user", t)
        kind, _, name = t.partition(":")
        if kind == "group" and _:
            if t not in self.groups:
                raise self.err(path, f"group {t!r} is not defined in 'groups'")
            return Sel("group", t)
        if kind == "tag" and _:
            if not NAME.fullmatch(name):
                raise self.err(path, f"{t!r} is not a valid tag name")
            if t not in self.tags:
                raise self.err(path, f"tag {t!r} is not defined in 'tagOwners'")
            return Sel("tag", t)
        if kind == "autogroup" and _:
            ag = "member" if name == "members" else name
            if ag not in AUTOGROUPS:
                raise self.err(path, f"unknown autogroup {t!r}")
            self.check_autogroup(ag, t, path, role)
            return Sel("autogroup", ag)
        if kind == "ipset" and _:
            if t not in self.ipsets:
                raise self.err(path, f"ipset {t!r} is not defined in 'ipsets'")
            return Sel("ipset", t, self.ipsets[t])
        if kind == "svc" and _:
            if role not in ("dst", "test", "owner-svc"):
                raise self.err(path, f"{t!r}: services can only be destinations")
            if not NAME.fullmatch(name):
                raise self.err(path, f"{t!r} is not a valid service name")
            return Sel("svc", t)
        if kind in ("group", "tag", "autogroup", "ipset", "svc", "posture"):
            raise self.err(path, f"{t!r}: missing a name after '{kind}:'")
        if t in self.hosts:
            if role == "owner":
                raise self.err(path, f"host {t!r} cannot own tags or approve routes")
            return Sel("host", t, (self.hosts[t],))
        raise self.err(path, f"{t!r} is not a user, group, tag, autogroup, IP, CIDR or a name defined in 'hosts'")

    def check_autogroup(self, ag: str, text: str, path: Path, role: str) -> None:
        if ag in SSH_ONLY and role != "ssh-user":
            raise self.err(path, f"{text!r} can only be used in ssh 'users'")
        if ag in SRC_ONLY and role not in ("src", "test"):
            raise self.err(path, f"{text!r} can only be a source")
        if ag in DST_ONLY and role not in ("dst", "ssh-dst", "test"):
            raise self.err(path, f"{text!r} can only be a destination")
        if role == "owner" and ag not in ROLE_AUTOGROUPS | {"member", "tagged"}:
            raise self.err(path, f"{text!r} cannot own tags or approve routes")

    def sels(self, v: Any, path: Path, role: str) -> tuple[Sel, ...]:
        return tuple(self.sel(s, (*path, i), role) for i, s in enumerate(self.strings(v, path)))

    # -- sections ---------------------------------------------------------------------------------------

    def policy(self) -> Policy:
        root = self.obj(self.doc.value, (), TOP_KEYS)
        # Definitions first: rules anywhere may reference them.
        self.tags = set(self.mapping(root.get("tagOwners", {}), ("tagOwners",)))
        self.parse_groups(root.get("groups", {}))
        self.parse_hosts(root.get("hosts", {}))
        self.parse_ipsets(root.get("ipsets", {}))
        self.parse_postures(root.get("postures", {}))
        tag_owners = self.parse_tag_owners(root.get("tagOwners", {}))

        acls: list[AclEntry] = []
        grants: list[Grant] = []
        rules: list[Rule] = []
        if "acls" in root:
            v = root["acls"]
            if not isinstance(v, list):
                raise self.err(("acls",), f"expected an array of rules, got {_kind(v)}")
            for i, r in enumerate(v):
                entry, rule = self.parse_acl(r, ("acls", i))
                acls.append(entry)
                rules.append(rule)
        if "grants" in root:
            v = root["grants"]
            if not isinstance(v, list):
                raise self.err(("grants",), f"expected an array of grants, got {_kind(v)}")
            for i, g in enumerate(v):
                grant, grules = self.parse_grant(g, ("grants", i))
                grants.append(grant)
                rules.extend(grules)
        default_posture = self.posture_refs(root.get("defaultSrcPosture", []), ("defaultSrcPosture",))
        options: dict[str, Any] = {}
        for k in ("disableIPv4", "randomizeClientPort"):
            if k in root:
                options[k] = self.boolean(root[k], (k,))
        if "OneCGNATRoute" in root:
            options["OneCGNATRoute"] = self.string(root["OneCGNATRoute"], ("OneCGNATRoute",), empty=True)
        if "derpMap" in root:
            options["derpMap"] = self.mapping(root["derpMap"], ("derpMap",))
        if "attrConfig" in root:
            options["attrConfig"] = self.parse_attr_config(root["attrConfig"])
        return Policy(
            raw=root,
            filename=self.doc.filename,
            groups=self.groups,
            tag_owners=tag_owners,
            hosts=self.hosts,
            ipsets=self.ipsets,
            acls=tuple(acls),
            grants=tuple(grants),
            rules=tuple(rules),
            has_rules="acls" in root or "grants" in root,
            tests=self.parse_tests(root.get("tests", [])),
            ssh=self.parse_ssh(root.get("ssh", [])),
            ssh_tests=self.parse_ssh_tests(root.get("sshTests", [])),
            node_attrs=self.parse_node_attrs(root.get("nodeAttrs", [])),
            postures=self.postures,
            default_src_posture=default_posture,
            auto_approvers=self.parse_auto_approvers(root.get("autoApprovers", {})),
            options=options,
        )

    def parse_groups(self, v: Any) -> None:
        for name, members in self.mapping(v, ("groups",)).items():
            path: Path = ("groups", name)
            if not name.startswith("group:") or not NAME.fullmatch(name[6:]):
                raise self.err(path, f"group name {name!r} must look like 'group:name'", at_key=True)
            users = self.strings(members, path)
            for i, u in enumerate(users):
                if "@" not in u:
                    raise self.err((*path, i), f"group members must be user logins (with '@'), got {u!r}")
            self.groups[name] = tuple(u.strip() for u in users)

    def parse_hosts(self, v: Any) -> None:
        for name, addr in self.mapping(v, ("hosts",)).items():
            path: Path = ("hosts", name)
            if not NAME.fullmatch(name) or ":" in name or "@" in name:
                raise self.err(path, f"host name {name!r} is not valid", at_key=True)
            net = ip_net(self.string(addr, path))
            if net is None:
                raise self.err(path, f"expected an IP address or CIDR, got {addr!r}")
            self.hosts[name] = net

    def parse_ipsets(self, v: Any) -> None:
        raw = self.mapping(v, ("ipsets",))
        for name in raw:
            if not name.startswith("ipset:") or not NAME.fullmatch(name[6:]):
                raise self.err(("ipsets", name), f"ipset name {name!r} must look like 'ipset:name'", at_key=True)
        resolving: set[str] = set()

        def resolve(name: str, path: Path) -> tuple[IPNet, ...]:
            if name in self.ipsets:
                return self.ipsets[name]
            if name in resolving:
                raise self.err(path, f"ipset {name!r} refers to itself")
            resolving.add(name)
            added: list[IPNet] = []
            removed: list[IPNet] = []
            for i, entry in enumerate(self.strings(raw[name], ("ipsets", name))):
                epath: Path = ("ipsets", name, i)
                op, _, what = entry.strip().partition(" ")
                if not _:
                    op, what = "add", entry.strip()
                if op not in ("add", "remove"):
                    raise self.err(epath, f"expected 'add <ip|cidr|ipset|host>' or 'remove ...', got {entry!r}")
                what = what.strip()
                if what.startswith("ipset:"):
                    if what not in raw:
                        raise self.err(epath, f"ipset {what!r} is not defined in 'ipsets'")
                    nets = resolve(what, epath)
                elif what in self.hosts:
                    nets = (self.hosts[what],)
                else:
                    net = ip_net(what)
                    if net is None:
                        raise self.err(epath, f"expected an IP, CIDR, host or ipset, got {what!r}")
                    nets = (net,)
                (added if op == "add" else removed).extend(nets)
            result: list[IPNet] = []
            for n in added:
                parts = [n]
                for r in removed:
                    parts = [q for p in parts for q in _minus(p, r)]
                result.extend(parts)
            self.ipsets[name] = tuple(result)
            resolving.discard(name)
            return self.ipsets[name]

        for name in raw:
            resolve(name, ("ipsets", name))

    def parse_postures(self, v: Any) -> None:
        for name, exprs in self.mapping(v, ("postures",)).items():
            path: Path = ("postures", name)
            if not name.startswith("posture:") or not NAME.fullmatch(name[8:]):
                raise self.err(path, f"posture name {name!r} must look like 'posture:name'", at_key=True)
            items = self.strings(exprs, path)
            for i, e in enumerate(items):
                if parse_posture_expr(e) is None:
                    raise self.err((*path, i), f"expected 'attribute OP value' (OP: == != < <= > >= IN), got {e!r}")
            self.postures[name] = items

    def posture_refs(self, v: Any, path: Path) -> tuple[str, ...]:
        names = self.strings(v, path)
        for i, n in enumerate(names):
            if n not in self.postures:
                raise self.err((*path, i), f"posture {n!r} is not defined in 'postures'")
        return names

    def parse_tag_owners(self, v: Any) -> dict[str, tuple[Sel, ...]]:
        out: dict[str, tuple[Sel, ...]] = {}
        for tag, owners in self.mapping(v, ("tagOwners",)).items():
            path: Path = ("tagOwners", tag)
            if not tag.startswith("tag:") or not NAME.fullmatch(tag[4:]):
                raise self.err(path, f"tag name {tag!r} must look like 'tag:name'", at_key=True)
            out[tag] = self.sels(owners, path, "owner")
        return out

    def parse_acl(self, v: Any, path: Path) -> tuple[AclEntry, Rule]:
        r = self.obj(v, path, {"action", "src", "dst", "proto", "users", "ports", "srcPosture"}, ("action",))
        action = self.string(r["action"], (*path, "action"))
        if action != "accept":
            raise self.err((*path, "action"), f'expected "accept", got {action!r}')
        for new, old in (("src", "users"), ("dst", "ports")):
            if new in r and old in r:
                raise self.err((*path, old), f"use either {new!r} or the legacy {old!r}, not both", at_key=True)
            if new not in r and old not in r:
                raise self.err(path, f"missing required key {new!r}")
        skey = "src" if "src" in r else "users"
        dkey = "dst" if "dst" in r else "ports"
        src_text = self.strings(r[skey], (*path, skey))
        dst_text = self.strings(r[dkey], (*path, dkey))
        src = self.sels(r[skey], (*path, skey), "src")
        dsts: list[Dst] = []
        for i, d in enumerate(dst_text):
            dpath: Path = (*path, dkey, i)
            split = split_alias_ports(d.strip())
            if split is None:
                raise self.err(dpath, f"expected 'alias:ports' (e.g. 'tag:web:443'), got {d!r}")
            ports = parse_ports(split[1])
            if ports is None and split[0] in ("tag", "group", "autogroup", "ipset", "svc"):
                raise self.err(dpath, f"{d!r} has no ports: expected 'alias:ports', e.g. '{d}:*'")
            if ports is None:
                raise self.err(dpath, f"bad ports {split[1]!r}: expected '*', '22', '80,443' or '1000-2000'")
            dsts.append(Dst(self.sel(split[0], dpath, "dst"), ports))
        protos: tuple[int, ...] = ()
        proto = None
        if "proto" in r:
            proto = self.string(r["proto"], (*path, "proto"))
            n = parse_proto(proto)
            if n is None:
                raise self.err((*path, "proto"), f"unknown protocol {proto!r}: expected an IANA name or 0-255")
            protos = (n,)
        posture = self.posture_refs(r["srcPosture"], (*path, "srcPosture")) if "srcPosture" in r else None
        self.check_self(src, dsts, path, skey)
        entry = AclEntry(action, src_text, dst_text, proto, posture)
        return entry, Rule(path, src, tuple(dsts), protos, (), posture)

    def check_self(self, src: tuple[Sel, ...], dsts: list[Dst], path: Path, skey: str) -> None:
        if any(d.sel.kind == "autogroup" and d.sel.name == "self" for d in dsts):
            for i, s in enumerate(src):
                ok = s.kind in ("user", "group", "all") or (s.kind == "autogroup" and s.name == "member")
                ok = ok or (s.kind == "autogroup" and s.name in ROLE_AUTOGROUPS)
                if not ok:
                    raise self.err(
                        (*path, skey, i),
                        f"{s.name!r} cannot be a source for autogroup:self; use users, groups or autogroup:member",
                    )

    def parse_grant(self, v: Any, path: Path) -> tuple[Grant, list[Rule]]:
        g = self.obj(v, path, {"src", "dst", "ip", "app", "via", "srcPosture"}, ("src", "dst"))
        src = self.sels(g["src"], (*path, "src"), "src")
        dst_sels = self.sels(g["dst"], (*path, "dst"), "dst")
        ip = self.strings(g["ip"], (*path, "ip")) if "ip" in g else ()
        via = self.strings(g.get("via", []), (*path, "via"))
        for i, t in enumerate(via):
            # Tailscale documents tags here; real files also name routers by host, which we keep.
            if self.sel(t, (*path, "via", i), "src").kind not in ("tag", "host", "prefix"):
                raise self.err((*path, "via", i), f"'via' takes tags (or router hosts), got {t!r}")
        app = self.mapping(g["app"], (*path, "app")) if "app" in g else None
        if app is not None:
            for cap, vals in app.items():
                if not isinstance(vals, list) or not all(isinstance(x, dict) for x in vals):
                    raise self.err((*path, "app", cap), "expected an array of objects")
        posture = self.posture_refs(g["srcPosture"], (*path, "srcPosture")) if "srcPosture" in g else None
        self.check_self(src, [Dst(s, ALL_PORTS) for s in dst_sels], path, "src")
        # One Rule per distinct protocol set, so each compiles to one FilterRule shape.
        by_proto: dict[tuple[int, ...], list[PortRange]] = {}
        for i, spec in enumerate(ip):
            protos, ports = self.ip_spec(spec.strip(), (*path, "ip", i))
            by_proto.setdefault(protos, []).extend(ports)
        rules = [
            Rule(path, src, tuple(Dst(s, tuple(ports)) for s in dst_sels), protos, via, posture)
            for protos, ports in by_proto.items()
        ]
        return Grant(tuple(g["src"]), tuple(g["dst"]), ip, via, app, posture, src, dst_sels), rules

    def ip_spec(self, spec: str, path: Path) -> tuple[tuple[int, ...], tuple[PortRange, ...]]:
        if spec == "*":
            return (), ALL_PORTS
        proto_text, _, port_text = spec.rpartition(":")
        protos: tuple[int, ...] = ()
        if proto_text and proto_text != "*":
            n = parse_proto(proto_text)
            if n is None:
                raise self.err(path, f"unknown protocol {proto_text!r} in {spec!r}")
            protos = (n,)
        ports = parse_ports(port_text)
        if ports is None:
            raise self.err(path, f"expected '*', 'ports' or 'proto:ports' (e.g. 'tcp:443'), got {spec!r}")
        return protos, ports

    def parse_tests(self, v: Any) -> tuple[Test, ...]:
        if not isinstance(v, list):
            raise self.err(("tests",), f"expected an array of tests, got {_kind(v)}")
        out: list[Test] = []
        for i, t in enumerate(v):
            path: Path = ("tests", i)
            t = self.obj(t, path, {"src", "proto", "accept", "deny", "allow", "srcPostureAttrs"}, ("src",))
            src = self.string(t["src"], (*path, "src"))
            self.sel(src, (*path, "src"), "test")
            proto = None
            if "proto" in t:
                proto = self.string(t["proto"], (*path, "proto"))
                if parse_proto(proto) is None:
                    raise self.err((*path, "proto"), f"unknown protocol {proto!r}")
            if "accept" in t and "allow" in t:
                raise self.err((*path, "allow"), "use 'accept' or the legacy 'allow', not both", at_key=True)
            akey = "accept" if "accept" in t else "allow"
            accept = self.test_dsts(t.get(akey, []), (*path, akey))
            deny = self.test_dsts(t.get("deny", []), (*path, "deny"))
            attrs = self.mapping(t["srcPostureAttrs"], (*path, "srcPostureAttrs")) if "srcPostureAttrs" in t else None
            out.append(Test(src, proto, accept, deny, attrs))
        return tuple(out)

    def test_dsts(self, v: Any, path: Path) -> tuple[str, ...]:
        items = self.strings(v, path)
        for i, d in enumerate(items):
            split = split_alias_ports(d.strip())
            if split is None or parse_ports(split[1]) is None or "," in split[1] or "-" in split[1]:
                raise self.err((*path, i), f"expected 'host:port' with one port (e.g. 'tag:web:443'), got {d!r}")
            self.sel(split[0], (*path, i), "test")
        return items

    def parse_ssh(self, v: Any) -> tuple[SshRule, ...]:
        if not isinstance(v, list):
            raise self.err(("ssh",), f"expected an array of ssh rules, got {_kind(v)}")
        out: list[SshRule] = []
        keys = {"action", "src", "dst", "users", "checkPeriod", "recorder", "enforceRecorder", "acceptEnv"}
        for i, r in enumerate(v):
            path: Path = ("ssh", i)
            r = self.obj(r, path, keys, ("action", "src", "dst", "users"))
            action = self.string(r["action"], (*path, "action"))
            if action not in ("accept", "check"):
                raise self.err((*path, "action"), f'expected "accept" or "check", got {action!r}')
            src_sels = self.sels(r["src"], (*path, "src"), "ssh-src")
            dst_sels = self.sels(r["dst"], (*path, "dst"), "ssh-dst")
            users = self.strings(r["users"], (*path, "users"))
            for j, u in enumerate(users):
                self.ssh_user(u, (*path, "users", j))
            period = None
            if "checkPeriod" in r:
                period = self.string(r["checkPeriod"], (*path, "checkPeriod"))
                if period != "always" and not re.fullmatch(r"(\d+(\.\d+)?(h|m|s|ms))+", period):
                    raise self.err(
                        (*path, "checkPeriod"), f"expected a duration like '12h' or 'always', got {period!r}"
                    )
            recorder = self.strings(r.get("recorder", []), (*path, "recorder"))
            enforce = (
                self.boolean(r["enforceRecorder"], (*path, "enforceRecorder")) if "enforceRecorder" in r else False
            )
            env = self.strings(r.get("acceptEnv", []), (*path, "acceptEnv"))
            out.append(
                SshRule(
                    action, tuple(r["src"]), tuple(r["dst"]), users, period, recorder, enforce, env, src_sels, dst_sels
                )
            )
        return tuple(out)

    def ssh_user(self, u: str, path: Path) -> None:
        """An ssh `users` entry: autogroup:nonroot, localpart:*@domain, or a valid local user name."""
        if u.startswith("autogroup:"):
            self.sel(u, path, "ssh-user")
        elif u.startswith("localpart:"):
            if not re.fullmatch(r"localpart:\*@[A-Za-z0-9.-]+", u):
                raise self.err(path, f"expected 'localpart:*@domain', got {u!r}")
        elif not LOCAL_USER.fullmatch(u):
            raise self.err(path, f"{u!r} is not a valid local user name")

    def parse_ssh_tests(self, v: Any) -> tuple[SshTest, ...]:
        if not isinstance(v, list):
            raise self.err(("sshTests",), f"expected an array of ssh tests, got {_kind(v)}")
        out: list[SshTest] = []
        for i, t in enumerate(v):
            path: Path = ("sshTests", i)
            t = self.obj(t, path, {"src", "dst", "accept", "deny", "check"}, ("src", "dst"))
            src = self.string(t["src"], (*path, "src"))
            self.sel(src, (*path, "src"), "test")
            dst = self.strings(t["dst"], (*path, "dst"))
            for j, d in enumerate(dst):
                self.sel(d, (*path, "dst", j), "ssh-dst")
            lists = [self.strings(t.get(k, []), (*path, k)) for k in ("accept", "deny", "check")]
            for k, names in zip(("accept", "deny", "check"), lists, strict=True):
                for j, u in enumerate(names):
                    if u != "autogroup:nonroot" and not LOCAL_USER.fullmatch(u):  # nonroot: any user but root
                        raise self.err((*path, k, j), f"{u!r} is not a valid local user name")
            out.append(SshTest(src, dst, lists[0], lists[1], lists[2]))
        return tuple(out)

    def parse_node_attrs(self, v: Any) -> tuple[NodeAttr, ...]:
        if not isinstance(v, list):
            raise self.err(("nodeAttrs",), f"expected an array, got {_kind(v)}")
        out: list[NodeAttr] = []
        for i, a in enumerate(v):
            path: Path = ("nodeAttrs", i)
            a = self.obj(a, path, {"target", "attr", "ipPool", "app"}, ("target",))
            target = self.strings(a["target"], (*path, "target"))
            for j, t in enumerate(target):
                self.sel(t, (*path, "target", j), "target")
            attr = self.strings(a.get("attr", []), (*path, "attr"))
            pool = self.strings(a.get("ipPool", []), (*path, "ipPool"))
            for j, p in enumerate(pool):
                if ip_net(p) is None:
                    raise self.err((*path, "ipPool", j), f"expected a CIDR, got {p!r}")
            app = self.mapping(a["app"], (*path, "app")) if "app" in a else None
            if not ({"attr", "ipPool", "app"} & a.keys()):
                raise self.err(path, "a nodeAttrs entry needs 'attr', 'ipPool' or 'app'")
            out.append(NodeAttr(target, attr, pool, app))
        return tuple(out)

    def parse_auto_approvers(self, v: Any) -> AutoApprovers:
        path: Path = ("autoApprovers",)
        a = self.obj(v, path, {"routes", "exitNode", "services"})
        routes: dict[IPNet, tuple[Sel, ...]] = {}
        for cidr, owners in self.mapping(a.get("routes", {}), (*path, "routes")).items():
            rpath: Path = (*path, "routes", cidr)
            net = ip_net(cidr)
            if net is None:
                raise self.err(rpath, f"expected a CIDR route, got {cidr!r}", at_key=True)
            routes[net] = self.sels(owners, rpath, "owner")
        exit_node = self.sels(a.get("exitNode", []), (*path, "exitNode"), "owner")
        services: dict[str, tuple[Sel, ...]] = {}
        for svc, owners in self.mapping(a.get("services", {}), (*path, "services")).items():
            spath: Path = (*path, "services", svc)
            self.sel(svc, spath, "owner-svc")
            services[svc] = self.sels(owners, spath, "owner")
        return AutoApprovers(routes, exit_node, services)

    def parse_attr_config(self, v: Any) -> dict[str, Any]:
        path: Path = ("attrConfig",)
        out = self.mapping(v, path)
        for name, conf in out.items():
            cpath: Path = (*path, name)
            c = self.obj(conf, cpath, {"type", "allowSetByNode", "broadcastToPeers"})
            if "type" in c and c["type"] not in ("string", "number", "bool"):
                raise self.err((*cpath, "type"), f'expected "string", "number" or "bool", got {c["type"]!r}')
            if "allowSetByNode" in c:
                self.boolean(c["allowSetByNode"], (*cpath, "allowSetByNode"))
            if "broadcastToPeers" in c:
                self.strings(c["broadcastToPeers"], (*cpath, "broadcastToPeers"))
        return out


PostureExpr = tuple[str, str, Any]


def parse_posture_expr(text: str) -> PostureExpr | None:
    """`node:os == 'linux'`, `node:tsVersion >= '1.80'`, `x IN ['a', 'b']` -> (attr, op, value)."""
    m = POSTURE_EXPR.match(text)
    if not m:
        return None
    raw = m.group("val")
    value: Any
    if raw.startswith("["):
        items = re.findall(r"'([^']*)'|\"([^\"]*)\"", raw)
        if not raw.endswith("]"):
            return None
        value = tuple(a or b for a, b in items)
    elif re.fullmatch(r"'[^']*'|\"[^\"]*\"", raw):
        value = raw[1:-1]
    elif re.fullmatch(r"-?\d+(\.\d+)?", raw):
        value = float(raw)
    elif raw in ("true", "false"):
        value = raw == "true"
    else:
        return None
    if m.group("op") in ("IN", "NOT IN") and not isinstance(value, tuple):
        return None
    return m.group("attr"), m.group("op"), value


def eval_posture_expr(expr: PostureExpr, attrs: dict[str, Any]) -> bool:
    """A condition on an attribute the node does not report is false, as in Tailscale."""
    attr, op, want = expr
    if attr not in attrs:
        return False
    have = attrs[attr]
    if op == "IN":
        return str(have) in want
    if op == "NOT IN":
        return str(have) not in want
    cmp: Callable[[Any, Any], bool] = {
        "==": lambda a, b: a == b,
        "!=": lambda a, b: a != b,
        "<": lambda a, b: a < b,
        "<=": lambda a, b: a <= b,
        ">": lambda a, b: a > b,
        ">=": lambda a, b: a >= b,
    }[op]
    a, b = _comparable(have, want)
    try:
        return cmp(a, b)
    except TypeError:
        return False


def _comparable(a: Any, b: Any) -> tuple[Any, Any]:
    """Versions compare component-wise ('1.80.2' > '1.9'); anything else as given."""
    va, vb = _version(a), _version(b)
    if va is not None and vb is not None:
        return va, vb
    return (str(a), str(b)) if isinstance(b, str) else (a, b)


def _version(x: Any) -> tuple[int, ...] | None:
    if isinstance(x, float | int) and not isinstance(x, bool):
        return tuple(int(p) for p in str(x).split(".") if p.isdigit()) or None
    if isinstance(x, str) and re.fullmatch(r"v?\d+(\.\d+)*", x):
        return tuple(int(p) for p in x.lstrip("v").split("."))
    return None


def _minus(n: IPNet, cut: IPNet) -> list[IPNet]:
    if n.version != cut.version or not n.overlaps(cut):
        return [n]
    if n.subnet_of(cut):  # type: ignore[arg-type]
        return []
    return list(n.address_exclude(cut))  # type: ignore[arg-type]


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int | float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    return "an object"
