"""resolv.conf in direct mode: backup, idempotent set, restore, crash recovery, and the in-place write over
a bind mount (as `ip netns exec` makes it), where a rename fails with EBUSY."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from node.dns.osconf import HEADER, ResolvConf, nameservers

ORIG = "# the host's\nnameserver 192.0.2.53\nsearch example.net\n"


def test_dns_resolv_conf_backup_set_restore(tmp_path: Path) -> None:
    path, backup = tmp_path / "resolv.conf", tmp_path / "state" / "resolv.conf.shoal"
    backup.parent.mkdir()
    path.write_text(ORIG)
    rc = ResolvConf(path, backup)
    assert rc.set(["100.100.100.100"], ["shoal.internal."])
    text = path.read_text()
    assert text.startswith(HEADER) and "nameserver 100.100.100.100\nsearch shoal.internal\n" in text
    assert backup.read_text() == ORIG and nameservers(rc.original()) == ["192.0.2.53"]
    assert not rc.set(["100.100.100.100"], ["shoal.internal."])  # idempotent
    assert rc.set(["100.100.100.100"], ["a.example", "b.example"])
    assert backup.read_text() == ORIG  # the backup is never our own file
    assert rc.restore() and path.read_text() == ORIG and not backup.exists()
    assert not rc.restore()


def test_dns_resolv_conf_after_a_crash(tmp_path: Path) -> None:
    path, backup = tmp_path / "resolv.conf", tmp_path / "backup"
    path.write_text(ORIG)
    ResolvConf(path, backup).set(["100.100.100.100"], [])
    # the agent died; the next one finds the backup and puts it back before anything else
    again = ResolvConf(path, backup)
    assert nameservers(again.original()) == ["192.0.2.53"]
    assert again.restore() and path.read_text() == ORIG
    # our file without a backup (lost): never taken as the original
    path.write_text(f"{HEADER}\nnameserver 100.100.100.100\n")
    rc = ResolvConf(path, backup)
    assert rc.original() == ""
    rc.set(["100.100.100.100"], [])
    assert not backup.exists() or not backup.read_text().startswith(HEADER)


WRITER = r"""
import os, sys
from pathlib import Path
from node.dns.osconf import ResolvConf
target, backup = Path(sys.argv[1]), Path(sys.argv[2])
try:
    os.rename(sys.argv[3], target)
    print("rename-ok")
except OSError as e:
    print("rename-failed", e.errno)
rc = ResolvConf(target, backup)
rc.set(["100.100.100.100"], ["shoal.internal"])
print(open(target).read().splitlines()[1])
rc.restore()
print(open(target).read().splitlines()[1])
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_dns_resolv_conf_in_place_over_a_bind_mount(tmp_path: Path) -> None:
    src, target, other = tmp_path / "netns-resolv.conf", tmp_path / "resolv.conf", tmp_path / "other"
    src.write_text(ORIG)
    target.write_text("# stands for the host's file, never written\n")
    other.write_text("x\n")
    script = f"mount --bind {src} {target} && exec {sys.executable} -c '{WRITER}' {target} {tmp_path / 'bk'} {other}"
    p = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=30, cwd=Path(__file__).parents[2])
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "rename-failed 16"  # EBUSY: why the write is in place
    assert lines[1:] == ["nameserver 100.100.100.100", "nameserver 192.0.2.53"]
    assert src.read_text() == ORIG  # the bind-mounted file got both writes, and is back
    assert target.read_text() == "# stands for the host's file, never written\n"
