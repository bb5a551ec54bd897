"""Refused sign-ins: every one is counted, at most one per user per minute is written to the audit log.

Anyone with an account at the IdP can make refused sign-ins at will, so the log must not grow with them. The
counters live in memory (``total``, ``by_code``); ``count`` says when a refusal earns an event. Pure: ``now`` is
passed in. The per-user table forgets users whose minute is over and is capped besides.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

AUDIT_INTERVAL = 60.0
MAX_TRACKED = 10_000


class Refusals:
    def __init__(self, interval: float = AUDIT_INTERVAL, capacity: int = MAX_TRACKED) -> None:
        self.interval = interval
        self.capacity = capacity
        self.total = 0
        self.by_code: Counter[str] = Counter()
        self._last: OrderedDict[str, float] = OrderedDict()

    def count(self, user_key: str, code: str, now: float) -> bool:
        """Counts one refusal; True when it is to be recorded (the user's first in ``interval`` seconds)."""
        self.total += 1
        self.by_code[code] += 1
        while self._last:
            key, t = next(iter(self._last.items()))
            if now - t < self.interval:
                break
            del self._last[key]
        if user_key in self._last:
            return False
        while len(self._last) >= self.capacity:
            self._last.popitem(last=False)
        self._last[user_key] = now
        return True
