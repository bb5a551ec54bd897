"""Helpers for the API v2 tests: a CA and a server certificate made here, a TLS server, the real PyPI client.

The PyPI ``tailscale`` client's base URL is fixed to https://api.tailscale.com/api/v2/. Its aiohttp session here
resolves exactly that host to the local server and raises for any other name (there is no fall-back to the
system resolver, so nothing heads for the real host), and trusts only the test's CA.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tailscale import Tailscale

from coord.admin import run as admin_run
from tests.coord.harness import Running, free_port, running_server

API_HOST = "api.tailscale.com"


def make_ca(d: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, server cert, server key): a CA and a certificate for api.tailscale.com and 127.0.0.1."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shoal test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False),
                         critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, API_HOST)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(API_HOST),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_pem, cert_pem, key_pem = d / "ca.pem", d / "server.pem", d / "server.key"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    key_pem.chmod(0o600)
    return ca_pem, cert_pem, key_pem


class OnlyApiHost(AbstractResolver):
    """api.tailscale.com -> 127.0.0.1:<port>; every other name is an error."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.asked: list[str] = []

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        self.asked.append(host)
        if host != API_HOST:
            raise OSError(f"test resolver: {host!r} is not {API_HOST}")
        return [ResolveResult(hostname=host, host="127.0.0.1", port=self.port, family=socket.AF_INET, proto=0,
                              flags=socket.AI_NUMERICHOST)]

    async def close(self) -> None:
        pass


@contextlib.asynccontextmanager
async def tls_server(tmp: Path, **overrides: Any) -> AsyncIterator[tuple[Running, Path]]:
    ca, cert, key = make_ca(tmp)
    port = free_port()
    async with running_server(tmp / "data", tls_cert=str(cert), tls_key=str(key), listen=f"127.0.0.1:{port}",
                              server_url=f"https://127.0.0.1:{port}", **overrides) as srv:
        yield srv, ca


@contextlib.asynccontextmanager
async def client_session(port: int, ca: Path) -> AsyncIterator[tuple[aiohttp.ClientSession, OnlyApiHost]]:
    ctx = ssl.create_default_context(cafile=str(ca))
    resolver = OnlyApiHost(port)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=resolver, ssl=ctx)) as session:
        yield session, resolver


@contextlib.asynccontextmanager
async def tailscale_client(srv: Running, ca: Path, **auth: str) -> AsyncIterator[Tailscale]:
    async with client_session(srv.config.listen_addr[1], ca) as (session, _):
        client = Tailscale(session=session, request_timeout=10, **auth)
        try:
            yield client
        finally:
            await client.close()


async def admin(srv: Running, command: str, **args: Any) -> Any:
    """An admin command as the CLI sends it over the admin socket (the same code, in this process)."""
    return await admin_run(srv.app.admin, command, args)


async def token(srv: Running, user: str, role: str | None = None) -> str:
    """A user (created if missing) with ``role``, and a new API access token of theirs."""
    if srv.svc.state.user_by_name(user) is None:
        await admin(srv, "users.create", name=user)
    if role is not None:
        await admin(srv, "users.role", user=user, role=role)
    out = await admin(srv, "tokens.create", user=user, expiry=3600.0)
    return str(out["token"])
