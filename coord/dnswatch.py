"""The watched ``extra_records_file`` (coord/dns.py has its format): polled, and each change an event.

At start a missing or bad file is a ConfigError (the server does not start on a typo). Afterwards a change is read
on the next poll; a bad version is logged once and the last good records stay in force, so an editor's half-written
file never empties every node's records. The file is read whole each poll (it is capped at ``MAX_BYTES``): a
rewrite within one mtime tick, or with the same size, is still seen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from coord.errors import ConfigError, DomainError
from coord.service import Service

log = logging.getLogger("shoal.dns")

MAX_BYTES = 4 << 20


@dataclass
class RecordsWatch:
    path: Path
    service: Service
    _last: bytes | None = None

    def _read(self) -> bytes:
        with self.path.open("rb") as f:
            data = f.read(MAX_BYTES + 1)
        if len(data) > MAX_BYTES:
            raise ValueError(f"larger than {MAX_BYTES} bytes")
        return data

    async def start(self) -> None:
        """The first load: ConfigError when the file cannot be read or is not a records file."""
        try:
            data = self._read()
            text = data.decode()
        except (OSError, ValueError) as e:
            reason = e.strerror if isinstance(e, OSError) else str(e)
            raise ConfigError(f"dns.extra_records_file {self.path}: {reason}") from None
        try:
            await self.service.load_dns_file(str(self.path), text)
        except DomainError as e:
            raise ConfigError(f"dns.extra_records_file {e}") from None
        self._last = data

    async def poll(self) -> bool:
        """One poll: True when the file changed and its records were logged."""
        try:
            data = self._read()
        except (OSError, ValueError) as e:
            if self._last != b"":
                reason = e.strerror if isinstance(e, OSError) else str(e)
                log.error("dns.extra_records_file %s: %s; the last good records stay", self.path, reason)
            self._last = b""
            return False
        if data == self._last:
            return False
        self._last = data
        try:
            changed = await self.service.load_dns_file(str(self.path), data.decode())
        except (DomainError, UnicodeDecodeError) as e:
            log.error("dns.extra_records_file: %s; the last good records stay", e)
            return False
        if changed:
            log.info("dns.extra_records_file %s: records reloaded", self.path)
        return changed
