"""MagicDNS labels: hostname sanitising and collision suffixes, as Tailscale and Headscale do them."""

from __future__ import annotations

import re
from collections.abc import Container

_STRIP_SUFFIXES = (".localdomain", ".local", ".lan")
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_USER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$")
_TAG = re.compile(r"^tag:[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


def sanitize_hostname(hostname: str) -> str:
    """Lowercase DNS label from an OS hostname; ``node`` when nothing usable is left."""
    h = hostname.strip().lower()
    for suffix in _STRIP_SUFFIXES:
        if h.endswith(suffix):
            h = h[: -len(suffix)]
            break
    out = []
    for ch in h:
        if ch.isascii() and (ch.isalnum() or ch == "-"):
            out.append(ch)
        elif ch in " .@_":
            out.append("-")
    label = "".join(out)[:63].strip("-")
    label = re.sub(r"-{2,}", "-", label)
    return label or "node"


def unique_label(label: str, taken: Container[str]) -> str:
    """``laptop``, then ``laptop-1``, ``laptop-2``...: the first free one."""
    if label not in taken:
        return label
    n = 1
    while True:
        suffix = f"-{n}"
        cand = label[: 63 - len(suffix)] + suffix
        if cand not in taken:
            return cand
        n += 1


def valid_label(label: str) -> bool:
    return bool(_LABEL.match(label))


def valid_user_name(name: str) -> bool:
    return bool(_USER.match(name))


def valid_tag(tag: str) -> bool:
    return bool(_TAG.match(tag))
