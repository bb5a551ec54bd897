from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from node.keys import BadKey, KeyStore, PrivateKey, PublicKey, StateFileError


def test_text_forms_round_trip() -> None:
    k = PrivateKey.generate("discokey")
    pub = k.public()
    assert str(pub).startswith("discokey:") and len(str(pub)) == len("discokey:") + 64
    assert PublicKey.parse(str(pub), "discokey") == pub
    assert PublicKey.from_b64(pub.b64, "discokey") == pub
    assert PublicKey.from_hex(pub.hex, "discokey") == pub
    with pytest.raises(BadKey, match="expected a nodekey"):
        PublicKey.parse(str(pub), "nodekey")
    with pytest.raises(BadKey, match="64 hex digits"):
        PublicKey.parse("nodekey:abcd")
    with pytest.raises(BadKey, match="not hex"):
        PublicKey.parse("nodekey:" + "zz" * 32)


def test_public_key_matches_wireguard_derivation() -> None:
    # RFC 7748 section 6.1 test vector (Alice)
    priv = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    pub = PrivateKey(priv).public()
    assert pub.hex == "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"


def test_repr_never_shows_private_key() -> None:
    k = PrivateKey.generate("mkey")
    for text in (repr(k), str(k), f"{k}", repr([k])):
        assert k.hex not in text and k.b64 not in text
        assert str(k.public()) in text


def test_store_creates_0600_and_reloads(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "state")
    keys = {p: store.load_or_create(p) for p in ("mkey", "nodekey", "discokey")}
    for prefix, key in keys.items():
        path = store.path(prefix)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_text() == f"privkey:{key.hex}\n"
    again = KeyStore(tmp_path / "state")
    assert {p: again.load_or_create(p) for p in keys} == keys
    assert [p.name for p in (tmp_path / "state").iterdir() if p.name.startswith(".")] == []


def test_replace_rotates(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    old = store.load_or_create("nodekey")
    new = store.replace("nodekey")
    assert new != old and store.load("nodekey") == new


@pytest.mark.parametrize(
    "content,why",
    [
        (b"", "does not start with 'privkey:'"),
        (b"privkey:1234\n", "64 hex digits"),
        (b"privkey:" + b"g" * 64, "not hex"),
        (b"\xff\xfe", "not ASCII"),
    ],
)
def test_corrupt_file_is_an_error_naming_the_file(tmp_path: Path, content: bytes, why: str) -> None:
    store = KeyStore(tmp_path)
    store.path("nodekey").write_bytes(content)
    with pytest.raises(StateFileError) as e:
        store.load_or_create("nodekey")
    assert str(store.path("nodekey")) in str(e.value)
    assert why in str(e.value) and "delete it" in str(e.value)
    assert store.path("nodekey").read_bytes() == content  # never silently replaced


def test_unreadable_file_is_an_error(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    store.path("mkey").mkdir()  # reading a directory fails even for root
    with pytest.raises(StateFileError, match=r"machine\.key"):
        store.load("mkey")
    assert os.path.isdir(store.path("mkey"))
