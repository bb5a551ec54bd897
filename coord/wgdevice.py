"""``shoal-server devices add-wg``: the key pair, the wg-quick config and its QR code, on the admin's side.

The private key is generated here, in the CLI process, and leaves it only inside the printed config and the
QR code PNG (created 0600): the server gets the public key alone (the `devices.add-wg` admin command), so no
event, projection row or log line holds it. The config (wg-quick's format):

    [Interface]
    PrivateKey = <base64>
    Address = 100.64.0.7/32, fd7a:115c:a1e0::7/128

    [Peer]                                   # the hub
    PublicKey = <base64 of the hub's node key>
    Endpoint = 192.0.2.10:41641              # --endpoint, else the first endpoint the hub reported
    AllowedIPs = 100.64.0.0/10, fd7a:115c:a1e0::/48
    PersistentKeepalive = 25

No DNS= line: wg-quick would need resolvconf for it, and MagicDNS for devices is not built.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import Any

import segno
from nacl.public import PrivateKey

KEEPALIVE = 25


def keypair() -> tuple[bytes, bytes]:
    k = PrivateKey.generate()
    return bytes(k), bytes(k.public_key)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _hub_endpoint(result: dict[str, Any], endpoint: str | None) -> str:
    if endpoint:
        return endpoint
    eps = result.get("hub_endpoints") or []
    if not eps:
        raise ValueError("the hub reported no endpoint; give one with --endpoint HOST:PORT")
    return str(eps[0])


def config_text(private_key: bytes, result: dict[str, Any], endpoint: str | None = None) -> str:
    hub_key = bytes.fromhex(str(result["hub_node_key"]).removeprefix("nodekey:"))
    return (
        "[Interface]\n"
        f"PrivateKey = {_b64(private_key)}\n"
        f"Address = {result['ipv4']}/32, {result['ipv6']}/128\n"
        "\n"
        "[Peer]\n"
        f"PublicKey = {_b64(hub_key)}\n"
        f"Endpoint = {_hub_endpoint(result, endpoint)}\n"
        f"AllowedIPs = {', '.join(result['tailnet'])}\n"
        f"PersistentKeepalive = {KEEPALIVE}\n"
    )


def qr_terminal(text: str) -> str:
    buf = io.StringIO()
    segno.make(text, error="L").terminal(out=buf, compact=True)
    return buf.getvalue()


def write_png(text: str, path: Path) -> None:
    """The QR code as a PNG, 0600 from creation (it holds the private key); an existing file is refused."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        segno.make(text, error="L").save(f, kind="png", scale=6)
