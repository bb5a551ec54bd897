"""Keys as the control protocol writes them.

Every key is Curve25519 (NaCl). On the wire a public key is written as ``<kind>:<64 hex>``:
``mkey:`` (machine key: long-lived, one per device), ``nodekey:`` (the WireGuard key, rotatable, also the node's
DERP address) and ``discokey:`` (per agent process, authenticates disco). The server has one long-term key, served
as ``mkey:`` by ``GET /key``; a node pins it on first contact (or from its config) and refuses any other.
"""

from __future__ import annotations

from coord.wire.errors import WireError

KEY_LEN = 32
KINDS = ("mkey", "nodekey", "discokey")


def key_text(kind: str, raw: bytes) -> str:
    if len(raw) != KEY_LEN:
        raise ValueError(f"{kind} must be {KEY_LEN} bytes, got {len(raw)}")
    return f"{kind}:{raw.hex()}"


def parse_key(text: object, kind: str, where: str = "key") -> bytes:
    """Parse ``kind:<64 hex>``; raises WireError naming ``where``."""
    if not isinstance(text, str):
        raise WireError(f"{where}: expected a string {kind}:<64 hex>")
    prefix, sep, hexpart = text.partition(":")
    if not sep or prefix != kind:
        raise WireError(f"{where}: expected prefix {kind}:")
    return parse_hex_key(hexpart, where)


def parse_opt_key(text: object, kind: str, where: str = "key") -> bytes | None:
    """Like parse_key, but a missing key (absent, null or "") is None."""
    return None if text is None or text == "" else parse_key(text, kind, where)


def parse_hex_key(hexpart: str, where: str = "key") -> bytes:
    if len(hexpart) != 2 * KEY_LEN:
        raise WireError(f"{where}: expected {2 * KEY_LEN} hex digits")
    try:
        raw = bytes.fromhex(hexpart)
    except ValueError:
        raise WireError(f"{where}: not hex") from None
    if len(raw) != KEY_LEN:  # fromhex skips spaces
        raise WireError(f"{where}: not hex")
    return raw
