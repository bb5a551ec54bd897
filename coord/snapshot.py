"""Projection snapshots: the folded ``State`` as bytes and back, and which snapshots to keep as they age.

A snapshot lets start-up (and a view of the tailnet at any past seq) fold only the events after it instead of the
whole log. It is a cache of the fold, never a source of truth: a snapshot that does not decode, whose layout
fingerprint differs from this code's, or whose (seq, hash) is not the log's, is ignored and the log is folded.

Format (``encode``/``decode``)::

    shoal-snapshot/2 <seq> <hash> <time> <layout> <sha256>\\n
    <zlib-compressed marshal of the state>

    seq     decimal: the state is the fold of events 1..seq
    hash    64 hex digits: the ``hash`` of event ``seq`` (``"0"*64`` for seq 0), checked against the log on load
    time    RFC 3339 UTC with microseconds: the ``time`` of event ``seq`` (what the retention rule ages by)
    layout  16 hex digits: a fingerprint of the State classes' field names (a code change that adds, drops or
            renames a field invalidates older snapshots instead of misreading them)
    sha256  64 hex digits: SHA-256 of the compressed body (a torn or bit-rotted file is caught before parsing)

The body is ``marshal`` (format version 2) of ``{"dns": [settings, seed], "users": [...], "keys": [...], "nodes":
[...], "index": {...}, "state": {...}}``: each dataclass is a tuple of its field values in declaration order, built
back positionally (dicts as ``(key, value)`` pairs in insertion order, so iteration order survives the round trip;
``by_identity`` as ``[issuer, subject, user id]``; sets sorted). Why marshal: it is C both ways and keeps tuples and
lists apart, so a 10,000-node state encodes and loads in tens of milliseconds (JSON took most of a second each way, on
the event loop for the encoding); version 2 writes no object references, so equal states give equal bytes. marshal is
not meant for bytes from strangers, and these are not: the file is the server's own, 0600 in its data directory
(whoever can write it can write shoal.db), and its sha256 is checked before it is unmarshalled. Encoding the same
state always gives the same bytes, and ``decode(encode(s)) == s`` for every state the fold makes. Version 2
(``shoal-snapshot/2``); version 1 (JSON) could not encode ``by_identity`` (tuple keys) at all.

Retention (``keep``): snapshots are taken every N events; as they age they are thinned to the *oldest* snapshot of
each bucket. Buckets are aligned to the epoch, 5 minutes wide, then 1 hour once the whole hour ended more than an
hour ago, 1 day once the day ended more than a day ago, 7 days once the week ended more than 30 days ago (``TIERS``;
each width divides the next). All snapshots of one bucket are judged together and a bucket only ever merges into
a wider one, so pruning as time passes keeps exactly what one pruning at the end would, and every period that had
a snapshot keeps one. The newest snapshot is always kept.

Pure: no file, no clock (``now`` is passed in).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import marshal
import operator
import re
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from coord.dns import DnsSettings
from coord.state import AuthKey, Node, State, User

MAGIC = "shoal-snapshot/2"
_HEADER = re.compile(
    r"^shoal-snapshot/2 (0|[1-9][0-9]{0,18}) ([0-9a-f]{64}) "
    r"([0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z) ([0-9a-f]{16}) ([0-9a-f]{64})$"
)
MAX_HEADER = 256

_CLASSES: tuple[type[Any], ...] = (User, AuthKey, Node, State, DnsSettings)
# State fields that hold records or indexes, encoded by hand below; the rest are plain JSON values.
_STATE_SPECIAL = {"users", "keys", "nodes", "by_machine", "by_node_key", "by_given_name", "keys_by_prefix",
                  "by_identity", "used_ipv4", "dns", "dns_seed"}


class SnapshotError(ValueError):
    """Bytes that are not a snapshot this code can read."""


def layout() -> str:
    names = ";".join(f"{c.__name__}:{','.join(f.name for f in dataclasses.fields(c))}" for c in _CLASSES)
    return hashlib.sha256(names.encode()).hexdigest()[:16]


def _getter(cls: type[Any]) -> Callable[[Any], tuple[Any, ...]]:
    names = [f.name for f in dataclasses.fields(cls)]
    get = operator.attrgetter(*names)
    return lambda obj: get(obj)  # a tuple of the field values, in declaration order (json writes tuples as lists)


def _tuple_fields(cls: type[Any]) -> tuple[int, list[int], list[int]]:
    """(number of fields, indexes of tuple fields, indexes of list fields): how a JSON row comes back."""
    fs = dataclasses.fields(cls)
    tuples = [i for i, f in enumerate(fs) if str(f.type).startswith("tuple")]
    lists = [i for i, f in enumerate(fs) if str(f.type).startswith("list")]
    return len(fs), tuples, lists


def _rows(cls: type[Any], rows: Any) -> list[Any]:
    """One object per row, built positionally (no per-field dict): a 10,000-node snapshot loads in milliseconds."""
    n, tuples, lists = _tuple_fields(cls)
    if not isinstance(rows, list):
        raise SnapshotError(f"{cls.__name__}: expected a list of rows")
    out = []
    for row in rows:
        if not isinstance(row, tuple) or len(row) != n:
            raise SnapshotError(f"{cls.__name__}: expected {n} fields")
        for want, idx in ((tuple, tuples), (list, lists)):
            for i in idx:
                if not isinstance(row[i], want):
                    name = dataclasses.fields(cls)[i].name
                    raise SnapshotError(f"{cls.__name__}.{name}: expected a {want.__name__}")
        out.append(cls(*row))
    return out


def body(state: State) -> dict[str, Any]:
    rest = {f.name: getattr(state, f.name) for f in dataclasses.fields(State) if f.name not in _STATE_SPECIAL}
    user, key, node, dns = _getter(User), _getter(AuthKey), _getter(Node), _getter(DnsSettings)
    return {
        "dns": [dns(state.dns), dns(state.dns_seed)],
        "users": [user(u) for u in state.users.values()],
        "keys": [key(k) for k in state.keys.values()],
        "nodes": [node(n) for n in state.nodes.values()],
        "index": {
            "by_machine": list(state.by_machine.items()),
            "by_node_key": list(state.by_node_key.items()),
            "by_given_name": list(state.by_given_name.items()),
            "keys_by_prefix": list(state.keys_by_prefix.items()),
            "by_identity": [[i, s, uid] for (i, s), uid in state.by_identity.items()],
            "used_ipv4": sorted(state.used_ipv4),
        },
        "state": rest,
    }


def from_body(obj: Any) -> State:
    try:
        users = _rows(User, obj["users"])
        keys = _rows(AuthKey, obj["keys"])
        nodes = _rows(Node, obj["nodes"])
        dns, dns_seed = _rows(DnsSettings, obj["dns"])
        idx = obj["index"]
        rest = obj["state"]
        plain = {f.name for f in dataclasses.fields(State)} - _STATE_SPECIAL
        if not isinstance(rest, dict) or set(rest) != plain:
            raise SnapshotError("state: fields do not match this code's State")
        return State(
            users={u.id: u for u in users},
            keys={k.id: k for k in keys},
            nodes={n.id: n for n in nodes},
            by_machine={str(k): int(v) for k, v in idx["by_machine"]},
            by_node_key={str(k): int(v) for k, v in idx["by_node_key"]},
            by_given_name={str(k): int(v) for k, v in idx["by_given_name"]},
            keys_by_prefix={str(k): int(v) for k, v in idx["keys_by_prefix"]},
            by_identity={(str(i), str(s)): int(uid) for i, s, uid in idx["by_identity"]},
            used_ipv4={str(a) for a in idx["used_ipv4"]},
            dns=dns,
            dns_seed=dns_seed,
            **rest,
        )
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, SnapshotError):
            raise
        raise SnapshotError(f"snapshot body: {type(e).__name__}: {e}") from None


def body_bytes(state: State) -> bytes:
    """The encoded body of ``state`` (the part that must be taken before the state folds on)."""
    return marshal.dumps(body(state), MARSHAL_VERSION)


MARSHAL_VERSION = 2  # no object references: the bytes depend on the values only


def encode(state: State, time: str, level: int = 1) -> bytes:
    """The snapshot of ``state`` (the fold of events 1..state.last_seq); ``time`` is event last_seq's time."""
    return seal(state.last_seq, state.last_hash, time, body_bytes(state), level)


def seal(seq: int, hash_: str, time: str, body_data: bytes, level: int = 1) -> bytes:
    """Compress and frame an encoded body (split from ``encode`` so the costly part can run off the event loop)."""
    payload = zlib.compress(body_data, level)
    digest = hashlib.sha256(payload).hexdigest()
    head = f"{MAGIC} {seq} {hash_} {time} {layout()} {digest}\n"
    if not _HEADER.match(head[:-1]):
        raise SnapshotError(f"cannot frame a snapshot at seq {seq} with time {time!r}")
    return head.encode() + payload


@dataclass(frozen=True)
class Header:
    seq: int
    hash: str
    time: str
    layout: str
    sha256: str


def header(data: bytes) -> Header:
    """The header line alone (cheap: lists snapshots without decompressing them)."""
    nl = data.find(b"\n", 0, MAX_HEADER)
    if nl < 0:
        raise SnapshotError("no snapshot header line")
    m = _HEADER.match(data[:nl].decode("ascii", "replace"))
    if m is None:
        raise SnapshotError(f"not a {MAGIC} header")
    return Header(int(m.group(1)), m.group(2), m.group(3), m.group(4), m.group(5))


def decode(data: bytes) -> State:
    h = header(data)
    if h.layout != layout():
        raise SnapshotError(f"snapshot layout {h.layout} is not this code's {layout()} (written by another version)")
    payload = data[data.index(b"\n") + 1:]
    if hashlib.sha256(payload).hexdigest() != h.sha256:
        raise SnapshotError("snapshot body does not match its sha256 (torn or corrupted file)")
    try:
        obj = marshal.loads(zlib.decompress(payload))
    except (zlib.error, ValueError, EOFError, TypeError) as e:
        raise SnapshotError(f"snapshot body: {e}") from None
    state = from_body(obj)
    if (state.last_seq, state.last_hash) != (h.seq, h.hash):
        raise SnapshotError("snapshot header and body disagree on seq/hash")
    return state


# --- retention --------------------------------------------------------------------------------------------

MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0

# (age, bucket width): a bucket of the next tier's width applies once that whole bucket ended more than ``age`` ago;
# the first width applies to everything younger. Widths nest: each divides the next.
TIERS: tuple[tuple[float, float], ...] = (
    (HOUR, 5 * MINUTE),
    (DAY, HOUR),
    (30 * DAY, DAY),
    (float("inf"), 7 * DAY),
)


@dataclass(frozen=True)
class Stored:
    """A snapshot as the retention rule sees it: its seq and the time of event ``seq`` (seconds)."""

    seq: int
    time: float


def bucket(t: float, now: float, tiers: tuple[tuple[float, float], ...] = TIERS) -> tuple[float, int]:
    """(width, index) of the bucket a snapshot at ``t`` falls in at ``now``.

    The widest tier whose whole bucket around ``t`` is old enough: all snapshots of one bucket get the same width,
    and as ``now`` grows a bucket only merges into a wider one.
    """
    width = tiers[0][1]
    for (age, _), (_, wider) in itertools.pairwise(tiers):
        end = (t // wider + 1) * wider
        if now - end < age:
            break
        width = wider
    return width, int(t // width)


def keep(snapshots: Iterable[Stored], now: float, tiers: tuple[tuple[float, float], ...] = TIERS) -> set[int]:
    """The seqs to keep: the newest, and the oldest snapshot of each bucket."""
    snaps = sorted(snapshots, key=lambda s: (s.time, s.seq))
    if not snaps:
        return set()
    kept = {max(s.seq for s in snaps)}
    seen: set[tuple[float, int]] = set()
    for s in snaps:
        b = bucket(s.time, now, tiers)
        if b not in seen:
            seen.add(b)
            kept.add(s.seq)
    return kept


def nearest(seqs: Iterable[int], seq: int) -> int | None:
    """The largest snapshot seq at or before ``seq``, or None."""
    best = None
    for s in seqs:
        if s <= seq and (best is None or s > best):
            best = s
    return best
