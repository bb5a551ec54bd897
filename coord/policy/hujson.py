"""HuJSON reading: values from the json5 library, source positions from a small index.

HuJSON is JSON plus `//` and `/* */` comments and trailing commas (tailscale.com/kb/1337). The json5
library parses a superset of it; we take values from json5 and refuse the json5-only syntax Tailscale
refuses (single quotes, unquoted keys, hex numbers, NaN/Infinity, leading `+`).

json5 gives neither positions for values nor duplicate-key errors, so `index()` walks the same text once
more with a tokenizer that knows strings and comments and records where every value and key starts.
Errors found later (a bad selector at `acls[3].dst[1]`) are mapped back to a line and column with it.

A path is a tuple of keys and indexes, e.g. ("acls", 3, "dst", 1); `fmt_path` renders it as
`acls[3].dst[1]`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import json5

Path = tuple[str | int, ...]

MAX_DEPTH = 64
MAX_BYTES = 4 * 1024 * 1024


class PolicyError(ValueError):
    """A policy that cannot be accepted; `str()` names the file, line, column, path and reason."""

    def __init__(self, reason: str, *, path: Path = (), line: int = 0, col: int = 0, filename: str = "") -> None:
        self.reason = reason
        self.path = path
        self.line = line
        self.col = col
        self.filename = filename
        super().__init__(self.render())

    def render(self) -> str:
        where = self.filename or "policy"
        if self.line:
            where += f":{self.line}:{self.col}"
        if self.path:
            where += f": {fmt_path(self.path)}"
        return f"{where}: {self.reason}"

    def as_dict(self) -> dict[str, Any]:
        return {"path": fmt_path(self.path), "line": self.line, "column": self.col, "reason": self.reason}


def fmt_path(path: Sequence[str | int]) -> str:
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p):
            out += ("." if out else "") + p
        else:
            out += f"[{p!r}]".replace("'", '"')
    return out


@dataclass(frozen=True)
class Doc:
    """A parsed document: its value and where each path starts (1-based line and column)."""

    value: Any
    positions: dict[Path, tuple[int, int]]
    keys: dict[Path, tuple[int, int]]
    filename: str

    def where(self, path: Path) -> tuple[int, int]:
        """Position of the value at `path`, or of its nearest ancestor that exists."""
        p = tuple(path)
        while p:
            if p in self.positions:
                return self.positions[p]
            p = p[:-1]
        return self.positions.get((), (1, 1))

    def error(self, path: Path, reason: str, *, at_key: bool = False) -> PolicyError:
        pos = self.keys.get(tuple(path)) if at_key else None
        line, col = pos or self.where(path)
        return PolicyError(reason, path=tuple(path), line=line, col=col, filename=self.filename)


def load(text: str | bytes, filename: str = "policy.hujson") -> Doc:
    if isinstance(text, bytes):
        if len(text) > MAX_BYTES:
            raise PolicyError(f"file is larger than {MAX_BYTES} bytes", filename=filename)
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PolicyError(f"not UTF-8: byte {e.start}", filename=filename) from None
    if len(text) > MAX_BYTES:
        raise PolicyError(f"file is larger than {MAX_BYTES} bytes", filename=filename)
    if text.startswith("\ufeff"):
        text = text[1:]
    positions, keys = _Indexer(text, filename).run()
    try:
        value = json5.loads(text)
    except (ValueError, RecursionError, OverflowError) as e:
        # The indexer accepted the text, so json5 disagreeing is rare; keep its message.
        m = re.match(r"<string>:(\d+) (.*) at column (\d+)", str(e))
        if m:
            raise PolicyError(m.group(2), line=int(m.group(1)), col=int(m.group(3)), filename=filename) from None
        raise PolicyError(f"invalid HuJSON: {e}", filename=filename) from None
    return Doc(value, positions, keys, filename)


_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_WORDS = ("true", "false", "null")


class _Indexer:
    """Strict HuJSON tokenizer recording positions; raises PolicyError with line/column on bad syntax."""

    def __init__(self, text: str, filename: str) -> None:
        self.s = text
        self.i = 0
        self.filename = filename
        self.positions: dict[Path, tuple[int, int]] = {}
        self.keys: dict[Path, tuple[int, int]] = {}
        # Line starts, so a position is a bisect rather than a count.
        self.starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def pos(self, i: int) -> tuple[int, int]:
        lo, hi = 0, len(self.starts) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.starts[mid] <= i:
                lo = mid
            else:
                hi = mid - 1
        return lo + 1, i - self.starts[lo] + 1

    def fail(self, reason: str, i: int | None = None, path: Path = ()) -> PolicyError:
        line, col = self.pos(self.i if i is None else i)
        return PolicyError(reason, path=path, line=line, col=col, filename=self.filename)

    def run(self) -> tuple[dict[Path, tuple[int, int]], dict[Path, tuple[int, int]]]:
        self.skip()
        if self.i >= len(self.s):
            raise self.fail("empty document: expected a JSON object")
        self.value((), 0)
        self.skip()
        if self.i < len(self.s):
            raise self.fail(f"unexpected {self.s[self.i]!r} after the end of the document")
        return self.positions, self.keys

    def skip(self) -> None:
        s, n = self.s, len(self.s)
        while self.i < n:
            c = s[self.i]
            if c in " \t\r\n":
                self.i += 1
            elif s.startswith("//", self.i):
                j = s.find("\n", self.i)
                self.i = n if j < 0 else j + 1
            elif s.startswith("/*", self.i):
                j = s.find("*/", self.i + 2)
                if j < 0:
                    raise self.fail("unterminated /* comment")
                self.i = j + 2
            else:
                return

    def value(self, path: Path, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise self.fail(f"nested deeper than {MAX_DEPTH} levels", path=path)
        if self.i >= len(self.s):
            raise self.fail("unexpected end of file: expected a value", path=path)
        self.positions[path] = self.pos(self.i)
        c = self.s[self.i]
        if c == "{":
            self.obj(path, depth)
        elif c == "[":
            self.arr(path, depth)
        elif c == '"':
            self.string(path)
        else:
            m = _NUMBER.match(self.s, self.i)
            word = next((w for w in _WORDS if self.s.startswith(w, self.i)), None)
            if word:
                self.i += len(word)
            elif m and m.end() > self.i:
                self.i = m.end()
            else:
                what = "a single-quoted string" if c == "'" else repr(c)
                raise self.fail(f"unexpected {what}: expected a value (object, array, string, number)", path=path)
            if self.i < len(self.s) and (self.s[self.i].isalnum() or self.s[self.i] in "_.$"):
                raise self.fail(f"unexpected {self.s[self.i]!r} in a literal", path=path)

    def string(self, path: Path) -> str:
        s, start = self.s, self.i
        j = start + 1
        out: list[str] = []
        while True:
            if j >= len(s):
                raise self.fail("unterminated string", start, path)
            c = s[j]
            if c == '"':
                break
            if c == "\\":
                if j + 1 >= len(s):
                    raise self.fail("unterminated string", start, path)
                e = s[j + 1]
                if e == "u":
                    hx = s[j + 2 : j + 6]
                    if not re.fullmatch(r"[0-9A-Fa-f]{4}", hx):
                        raise self.fail("bad \\u escape", j, path)
                    out.append(chr(int(hx, 16)))
                    j += 6
                    continue
                if e not in '"\\/bfnrt':
                    raise self.fail(f"bad escape \\{e}", j, path)
                out.append(e)
                j += 2
                continue
            if c == "\n" or ord(c) < 0x20:
                raise self.fail("control character in string", j, path)
            out.append(c)
            j += 1
        self.i = j + 1
        return "".join(out)

    def obj(self, path: Path, depth: int) -> None:
        self.i += 1
        seen: set[str] = set()
        while True:
            self.skip()
            if self.i >= len(self.s):
                raise self.fail("unexpected end of file: expected '\"key\"' or '}'", path=path)
            if self.s[self.i] == "}":
                self.i += 1
                return
            if self.s[self.i] != '"':
                raise self.fail(f"unexpected {self.s[self.i]!r}: expected a double-quoted key or '}}'", path=path)
            kstart = self.i
            key = self.string(path)
            kpath = (*path, key)
            if key in seen:
                raise self.fail(f"duplicate key {key!r}", kstart, kpath)
            seen.add(key)
            self.keys[kpath] = self.pos(kstart)
            self.skip()
            if self.i >= len(self.s) or self.s[self.i] != ":":
                raise self.fail(f"expected ':' after key {key!r}", path=kpath)
            self.i += 1
            self.skip()
            self.value(kpath, depth + 1)
            self.skip()
            if self.i < len(self.s) and self.s[self.i] == ",":
                self.i += 1
                continue
            if self.i < len(self.s) and self.s[self.i] == "}":
                self.i += 1
                return
            raise self.fail("expected ',' or '}' after an object member", path=kpath)

    def arr(self, path: Path, depth: int) -> None:
        self.i += 1
        n = 0
        while True:
            self.skip()
            if self.i >= len(self.s):
                raise self.fail("unexpected end of file: expected a value or ']'", path=path)
            if self.s[self.i] == "]":
                self.i += 1
                return
            self.value((*path, n), depth + 1)
            n += 1
            self.skip()
            if self.i < len(self.s) and self.s[self.i] == ",":
                self.i += 1
                continue
            if self.i < len(self.s) and self.s[self.i] == "]":
                self.i += 1
                return
            raise self.fail("expected ',' or ']' after an array element", path=(*path, n - 1))
