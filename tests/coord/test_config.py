"""Configuration: TOML, then SHOAL_* environment variables, then flags; bad input names the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from coord.config import Config, load, parse_duration
from coord.errors import ConfigError


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "shoal.toml"
    p.write_text(text)
    return str(p)


def test_defaults() -> None:
    c = load(None, env={})
    assert c == Config()
    assert c.prefix_v4 == "100.64.0.0/10" and c.prefix_v6 == "fd7a:115c:a1e0::/48"
    assert c.base_domain == "shoal.internal"
    assert c.key_expiry_s == 180 * 86400
    assert c.ephemeral_timeout_s == 120
    assert c.batch_delay_s == pytest.approx(0.05)


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    path = write(tmp_path, 'listen = "127.0.0.1:9000"\nbase_domain = "file.example"\nkey_expiry = "30d"\n'
                           'derp = false\n')
    c = load(path, env={})
    assert (c.listen, c.base_domain, c.key_expiry_s, c.derp) == ("127.0.0.1:9000", "file.example", 30 * 86400, False)
    env = {"SHOAL_BASE_DOMAIN": "env.example", "SHOAL_KEY_EXPIRY": "0", "SHOAL_DERP": "yes"}
    c = load(path, env=env)
    assert (c.listen, c.base_domain, c.key_expiry_s, c.derp) == ("127.0.0.1:9000", "env.example", None, True)
    c = load(path, env=env, overrides={"base_domain": "flag.example", "listen": None})
    assert c.base_domain == "flag.example"
    assert c.listen == "127.0.0.1:9000", "a flag left unset must not override"


def test_shoal_data_env_is_the_data_dir(tmp_path: Path) -> None:
    assert load(None, env={"SHOAL_DATA": str(tmp_path)}).data_dir == str(tmp_path)
    both = {"SHOAL_DATA": "/a", "SHOAL_DATA_DIR": "/b"}
    assert load(None, env=both).data_dir == "/b"


def test_unknown_env_names_are_ignored() -> None:
    # The node agent's SHOAL_* variables share the namespace.
    assert load(None, env={"SHOAL_SOCKET": "/x", "SHOAL_STATE": "y"}) == Config()


def test_unknown_key_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'lisen'"):
        load(write(tmp_path, 'lisen = "1.2.3.4:5"\n'), env={})


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('listen = "nope"', "listen"),
        ('listen = "127.0.0.1:99999"', "listen"),
        ('server_url = "ftp://x"', "server_url"),
        ('prefix_v4 = "fd00::/8"', "prefix_v4"),
        ('prefix_v4 = "100.64.0.1/10"', "prefix_v4"),
        ('prefix_v6 = "10.0.0.0/8"', "prefix_v6"),
        ('base_domain = "NoDot"', "base_domain"),
        ('base_domain = "127.0.0.1"', "base_domain"),
        ('key_expiry = "soon"', "key_expiry"),
        ('ephemeral_timeout = "-5s"', "ephemeral_timeout"),
        ('batch_delay = "10 ms"', "batch_delay"),
        ('keepalive = [1, 2]', "keepalive"),
        ('derp = "maybe"', "derp"),
        ('stun_listen = "x"', "stun_listen"),
        ('log_level = "loud"', "log_level"),
        ("listen = true", "listen"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, toml: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, toml + "\n"), env={})
    assert str(e.value).startswith(key + ":") or f"{key}:" in str(e.value), str(e.value)


def test_bad_env_and_flag_values_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^keepalive:"):
        load(None, env={"SHOAL_KEEPALIVE": "often"})
    with pytest.raises(ConfigError, match=r"^derp:"):
        load(None, env={}, overrides={"derp": "perhaps"})


def test_base_domain_may_not_cover_the_server_host() -> None:
    with pytest.raises(ConfigError, match="base_domain"):
        load(None, env={}, overrides={"server_url": "https://hs.example.com", "base_domain": "example.com"})


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file"):
        load(write(tmp_path, "listen = \n"), env={})
    with pytest.raises(ConfigError, match="config file"):
        load(str(tmp_path / "absent.toml"), env={})


def test_durations() -> None:
    assert parse_duration("500ms") == pytest.approx(0.5)
    assert parse_duration("90") == 90
    assert parse_duration("1.5h") == 5400
    assert parse_duration("180d") == 180 * 86400
    with pytest.raises(ConfigError, match=r"^--in:"):
        parse_duration("1w", "--in")


def test_cli_reports_a_bad_config_in_one_line(tmp_path: Path) -> None:
    cfg = write(tmp_path, 'bogus = 1\n')
    p = subprocess.run(
        [sys.executable, "-m", "coord.cli", "--config", cfg, "--data", str(tmp_path / "d"), "users", "list"],
        capture_output=True, text=True, timeout=30,
    )
    assert p.returncode != 0
    assert p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown key 'bogus'" in lines[0], p.stderr
