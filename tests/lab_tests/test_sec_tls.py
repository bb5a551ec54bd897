"""Issue 11.5 in the lab: the server key pinned up front, and the control channel over HTTPS with a CA the test
makes (openssl CLI). shoal-server serves TLS in the internet namespace; shoald in the node namespaces verifies it
with --ca-file and refuses a server whose key is not the one given with --server-key."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab import Lab, one_lan
from tests.lab_tests.tailnet import SERVER_PORT, Tailnet

pytestmark = pytest.mark.lab


class TlsTailnet(Tailnet):
    @property
    def url(self) -> str:
        return f"https://{self.server_addr}:{SERVER_PORT}"


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_ca(d: Path, name: str) -> tuple[Path, Path]:
    key, pem = d / f"{name}.key", d / f"{name}.pem"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key),
            "-out", str(pem), "-days", "2", "-subj", f"/CN=Shoal test {name}")
    return key, pem


def make_cert(d: Path, ca: tuple[Path, Path], ip: str, name: str) -> tuple[Path, Path]:
    key, csr, pem, ext = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.pem", d / f"{name}.ext"
    ext.write_text(f"subjectAltName=IP:{ip}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key),
            "-out", str(csr), "-subj", f"/CN={ip}")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[1]), "-CAkey", str(ca[0]), "-CAcreateserial",
            "-out", str(pem), "-days", "2", "-extfile", str(ext))
    return pem, key


@pytest.fixture
def tls_tailnet(lab: Lab, tmp_path: Path) -> Iterator[TlsTailnet]:
    tn = TlsTailnet(lab, tmp_path)
    try:
        yield tn
    finally:
        for name in list(tn.agents):
            print(f"--- shoald {name} ---\n{tn.log(name)[-3000:]}")
        log = tmp_path / "server.log"
        if log.exists():
            print(f"--- server ---\n{log.read_text(errors='replace')[-3000:]}")


def test_sec_tls_and_pinned_server_key(tls_tailnet: TlsTailnet, tmp_path: Path) -> None:
    tn, lab = tls_tailnet, tls_tailnet.lab
    lab.build(one_lan(2))
    pki = tmp_path / "pki"
    pki.mkdir()
    ca = make_ca(pki, "ca")
    cert, key = make_cert(pki, ca, tn.server_addr, "server")
    other_ca = make_ca(pki, "other-ca")
    tn.start_server("--tls-cert", str(cert), "--tls-key", str(key))
    server_key = tn.admin("info")["ServerKey"]
    assert server_key.startswith("mkey:")
    auth = tn.auth_key()
    for n in ("n1", "n2"):
        tn.start_agent(n)

    # the system store does not know the test CA: refused, nothing pinned
    p = tn.shoal("n1", "up", "--login-server", tn.url, "--auth-key", auth, check=False)
    assert p.returncode == 1 and "certificate" in p.stderr.lower(), p.stderr
    # a CA that did not sign the server's certificate: refused
    p = tn.shoal("n1", "up", "--login-server", tn.url, "--auth-key", auth, "--ca-file", str(other_ca[1]),
                 check=False)
    assert p.returncode == 1 and "certificate" in p.stderr.lower(), p.stderr
    # the right CA but another server key: refused loudly, nothing registered
    wrong = "mkey:" + "ab" * 32
    p = tn.shoal("n1", "up", "--login-server", tn.url, "--auth-key", auth, "--ca-file", str(ca[1]),
                 "--server-key", wrong, check=False)
    assert p.returncode == 1, p.stderr
    assert server_key in p.stderr and wrong in p.stderr and "refus" in p.stderr, p.stderr
    assert tn.status("n1")["BackendState"] == "NeedsLogin"
    assert tn.admin("nodes", "list") == []
    # a malformed --server-key is a usage error before anything is sent
    p = tn.shoal("n1", "up", "--login-server", tn.url, "--server-key", "mkey:12", check=False)
    assert p.returncode == 2 and "--server-key" in p.stderr, p.stderr

    # the right CA and the right key: up, and the tunnel works
    for n in ("n1", "n2"):
        tn.shoal(n, "up", "--login-server", tn.url, "--auth-key", auth, "--hostname", n, "--ca-file", str(ca[1]),
                 "--server-key", server_key)
        assert tn.status(n)["BackendState"] == "Running"
    tn.wait_for("n1 to see n2", lambda: "n2" in tn.peer_names("n1"), timeout=20)
    assert tn.ping("n1", tn.ip("n2"), count=3)

    # the pin and the CA are remembered: after a shoald restart the node comes back over TLS by itself
    tn.stop_agent("n1")
    tn.start_agent("n1")
    tn.wait_for("n1 running again", lambda: tn.status("n1")["BackendState"] == "Running", timeout=30)
    assert tn.ping("n1", tn.ip("n2"), count=3)
