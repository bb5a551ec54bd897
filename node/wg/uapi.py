"""The WireGuard cross-platform UAPI text protocol (sans-IO codec).

Spoken over a unix socket (wireguard-go: /var/run/wireguard/IFACE.sock), see
https://www.wireguard.com/xplatform/. A request is `get=1\\n\\n` or `set=1\\n` followed by `key=value` lines
and an empty line. Keys are lowercase hex. The reply ends with `errno=N\\n\\n` (0 = success).

set (device keys first, then per peer, each peer section opened by `public_key=`):
    private_key=<hex>  listen_port=<n>  fwmark=<n> (0 clears it)  replace_peers=true
    public_key=<hex>  remove=true  endpoint=<ip:port|[ip6]:port>  persistent_keepalive_interval=<s>
    replace_allowed_ips=true  allowed_ip=<cidr> (repeated)
get reply: private_key, listen_port, fwmark, then per peer public_key, preshared_key, protocol_version,
    endpoint, last_handshake_time_sec, last_handshake_time_nsec, tx_bytes, rx_bytes,
    persistent_keepalive_interval, allowed_ip (repeated), then errno.
"""

from __future__ import annotations

from node.errors import LocalError
from node.keys import BadKey, PrivateKey, PublicKey
from node.wg.config import (
    ConfigError,
    DeviceState,
    DeviceUpdate,
    PeerState,
    canonical_endpoint,
    canonical_prefix,
)

GET = b"get=1\n\n"
MAX_REPLY = 16 * 1024 * 1024  # bound on what we buffer from the socket


class UapiError(LocalError, ValueError):
    """The device sent a malformed reply, or reported an errno."""


def render_set(update: DeviceUpdate) -> bytes:
    lines = ["set=1"]
    if update.private_key is not None:
        lines.append(f"private_key={update.private_key.hex}")
    if update.listen_port is not None:
        lines.append(f"listen_port={update.listen_port}")
    if update.fwmark is not None:
        lines.append(f"fwmark={update.fwmark}")
    for p in update.peers:
        lines.append(f"public_key={p.public_key.hex}")
        if p.remove:
            lines.append("remove=true")
            continue
        if p.endpoint is not None:
            lines.append(f"endpoint={p.endpoint}")
        if p.persistent_keepalive is not None:
            lines.append(f"persistent_keepalive_interval={p.persistent_keepalive}")
        if p.allowed_ips is not None:
            lines.append("replace_allowed_ips=true")
            lines.extend(f"allowed_ip={ip}" for ip in p.allowed_ips)
    return ("\n".join(lines) + "\n\n").encode()


def reply_complete(buf: bytes) -> bool:
    """True once `buf` holds a whole reply (it ends with the errno line and the blank line)."""
    return buf.endswith(b"\n\n") and (buf.startswith(b"errno=") or b"\nerrno=" in buf)


def parse_errno(reply: bytes) -> int:
    lines = _lines(reply)
    if not lines or not lines[-1].startswith("errno="):
        raise UapiError("reply has no errno line")
    return _int(lines[-1][len("errno=") :], "errno")


def check_set_reply(reply: bytes) -> None:
    errno = parse_errno(reply)
    if errno != 0:
        raise UapiError(f"device refused the configuration: errno={errno}")


def parse_get(reply: bytes) -> DeviceState:
    lines = _lines(reply)
    errno = parse_errno(reply)
    if errno != 0:
        raise UapiError(f"get failed: errno={errno}")
    private_key: PrivateKey | None = None
    listen_port = 0
    fwmark = 0
    peers: list[PeerState] = []
    peer: dict[str, object] | None = None

    def close() -> None:
        if peer is not None:
            peers.append(_peer(peer))

    for line in lines[:-1]:
        key, sep, value = line.partition("=")
        if not sep:
            raise UapiError(f"line without '=': {line[:40]!r}")
        if key == "public_key":
            close()
            peer = {"public_key": _pub(value), "allowed_ips": []}
        elif peer is None:
            if key == "private_key":
                private_key = _priv(value)
            elif key == "listen_port":
                listen_port = _int(value, key, 65535)
            elif key == "fwmark":
                fwmark = _int(value, key, 2**32 - 1)
            # unknown device keys are ignored, as the protocol asks of readers
        elif key == "endpoint":
            try:
                peer["endpoint"] = canonical_endpoint(value)
            except ConfigError as e:
                raise UapiError(str(e)) from None
        elif key == "allowed_ip":
            try:
                ips = peer["allowed_ips"]
                assert isinstance(ips, list)
                ips.append(canonical_prefix(value))
            except ConfigError as e:
                raise UapiError(str(e)) from None
        elif key in ("last_handshake_time_sec", "last_handshake_time_nsec", "rx_bytes", "tx_bytes"):
            peer[key] = _int(value, key)
        elif key == "persistent_keepalive_interval":
            peer[key] = _int(value, key, 65535)
    close()
    return DeviceState(private_key, listen_port, tuple(peers), fwmark)


def _peer(d: dict[str, object]) -> PeerState:
    sec = d.get("last_handshake_time_sec", 0)
    nsec = d.get("last_handshake_time_nsec", 0)
    assert isinstance(sec, int) and isinstance(nsec, int)
    pub = d["public_key"]
    ips = d["allowed_ips"]
    endpoint = d.get("endpoint")
    keepalive = d.get("persistent_keepalive_interval", 0)
    rx = d.get("rx_bytes", 0)
    tx = d.get("tx_bytes", 0)
    assert isinstance(pub, PublicKey) and isinstance(ips, list) and isinstance(keepalive, int)
    assert (endpoint is None or isinstance(endpoint, str)) and isinstance(rx, int) and isinstance(tx, int)
    return PeerState(
        public_key=pub,
        allowed_ips=tuple(ips),
        endpoint=endpoint,
        persistent_keepalive=keepalive,
        last_handshake=(sec + nsec / 1e9) if sec or nsec else None,
        rx_bytes=rx,
        tx_bytes=tx,
    )


def _lines(reply: bytes) -> list[str]:
    try:
        text = reply.decode("ascii")
    except UnicodeDecodeError:
        raise UapiError("reply is not ASCII") from None
    return [line for line in text.split("\n") if line]


def _int(value: str, what: str, limit: int = 2**64 - 1) -> int:
    if not value.isdigit() or not value.isascii() or len(value) > 20:
        raise UapiError(f"{what}={value[:40]!r} is not a number")
    n = int(value)
    if n > limit:
        raise UapiError(f"{what}={n} out of range")
    return n


def _pub(value: str) -> PublicKey:
    try:
        return PublicKey.from_hex(value)
    except BadKey as e:
        raise UapiError(f"public_key: {e}") from None


def _priv(value: str) -> PrivateKey:
    try:
        return PrivateKey(bytes.fromhex(value) if len(value) == 64 else b"")
    except (BadKey, ValueError) as e:
        raise UapiError(f"private_key: {e}") from None
