"""HuJSON reading: one pass decides both the value and where every value and key starts.

Grammar, as tailscale/hujson (the reader Tailscale uses for policy files) defines it: JSON (RFC 8259) plus
- `//` comments, which end at the next `\\n` and nowhere else: a `\\r`, U+2028 or U+2029 inside one is part of
  the comment, and a `//` comment with no newline after it is an error;
- `/* */` comments (not nested);
- a comma after the last member of an object or element of an array (not `[,]` or `{,}`).
Nothing else: no single quotes, unquoted keys, hex, NaN/Infinity, leading `+` or `.`; whitespace is space, tab,
CR and LF only. Literals are read as hujson reads them (the longest run of `[-+.A-Za-z0-9]`, which must be
`true`, `false`, `null` or a JSON number), so `1x` or `nulls` is one bad literal, not a value and junk.

Values decode as Go's encoding/json decodes them (what Tailscale then applies): an escaped surrogate pair is one
character and a lone escaped surrogate becomes U+FFFD. Integers become `int`, other numbers `float`, as in
Python's json. Where we are stricter than hujson: the file must be UTF-8, a key may not repeat in an object
(Go keeps the last silently; a repeat is how a rule hides), nesting stops at 64 levels and files at 4 MiB.
A leading byte-order mark is dropped.

Positions are 1-based line and column (columns count characters; lines end at `\\n` only, as in hujson).
Errors found later (a bad selector at `acls[3].dst[1]`) are mapped back to a position through `Doc`.

A path is a tuple of keys and indexes, e.g. ("acls", 3, "dst", 1); `fmt_path` renders it as
`acls[3].dst[1]`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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


def line_col(text: str, i: int) -> tuple[int, int]:
    """1-based line and column of offset `i`; only `\\n` ends a line."""
    return text.count("\n", 0, i) + 1, i - text.rfind("\n", 0, i)


@dataclass(frozen=True)
class Doc:
    """A parsed document: its value and the offset where each value (`starts`) and key (`key_starts`) begins."""

    value: Any
    text: str
    starts: dict[Path, int]
    key_starts: dict[Path, int]
    filename: str

    def where(self, path: Path) -> tuple[int, int]:
        """Position of the value at `path`, or of its nearest ancestor that exists."""
        p = tuple(path)
        while p and p not in self.starts:
            p = p[:-1]
        return line_col(self.text, self.starts.get(p, 0))

    def error(self, path: Path, reason: str, *, at_key: bool = False) -> PolicyError:
        k = self.key_starts.get(tuple(path)) if at_key else None
        line, col = line_col(self.text, k) if k is not None else self.where(path)
        return PolicyError(reason, path=tuple(path), line=line, col=col, filename=self.filename)


def load(text: str | bytes, filename: str = "policy.hujson") -> Doc:
    if len(text) > MAX_BYTES:
        raise PolicyError(f"file is larger than {MAX_BYTES} bytes", filename=filename)
    if isinstance(text, bytes):
        raw = text
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            good = raw[: e.start].decode("utf-8")
            line, col = line_col(good, len(good))
            raise PolicyError(f"not UTF-8: byte {e.start}", line=line, col=col, filename=filename) from None
    else:
        # A str can hold what no UTF-8 file can; such a value could not even be stored.
        m = re.search("[\ud800-\udfff]", text)
        if m:
            line, col = line_col(text, m.start())
            raise PolicyError("not valid Unicode: a lone surrogate", line=line, col=col, filename=filename)
    if text.startswith("\ufeff"):
        text = text[1:]
    r = _Reader(text, filename)
    return Doc(r.document(), text, r.starts, r.key_starts, filename)


# Whitespace and comments as hujson has them; `[^\n]*\n` is the whole of the line-comment rule.
_EXTRA = re.compile(r"(?:[ \t\r\n]+|//[^\n]*\n|/\*(?s:.*?)\*/)*")
_PLAIN = re.compile(r'[^"\\\x00-\x1f]*')
_LITERAL = re.compile(r"[-+.A-Za-z0-9]+")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_HEX4 = re.compile(r"[0-9A-Fa-f]{4}")
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_WORDS: dict[str, Any] = {"true": True, "false": False, "null": None}
_VALUE = "expected a value (object, array, string, number, true, false or null)"


class _Reader:
    def __init__(self, text: str, filename: str) -> None:
        self.s = text
        self.n = len(text)
        self.filename = filename
        self.starts: dict[Path, int] = {}
        self.key_starts: dict[Path, int] = {}

    def fail(self, reason: str, i: int, path: Path = ()) -> PolicyError:
        line, col = line_col(self.s, i)
        return PolicyError(reason, path=path, line=line, col=col, filename=self.filename)

    def document(self) -> Any:
        i = self.skip(0)
        if i >= self.n:
            raise self.fail("empty document: expected a JSON object", i)
        value, i = self.value(i, (), 0)
        i = self.skip(i)
        if i < self.n:
            raise self.fail(f"unexpected {self.s[i]!r} after the end of the document", i)
        return value

    def skip(self, i: int) -> int:
        m = _EXTRA.match(self.s, i)
        i = m.end() if m else i
        if self.s.startswith("//", i):
            raise self.fail("unterminated // comment: a line comment ends with a newline", i)
        if self.s.startswith("/*", i):
            raise self.fail("unterminated /* comment", i)
        return i

    def value(self, i: int, path: Path, depth: int) -> tuple[Any, int]:
        if depth > MAX_DEPTH:
            raise self.fail(f"nested deeper than {MAX_DEPTH} levels", i, path)
        if i >= self.n:
            raise self.fail(f"unexpected end of file: {_VALUE}", i, path)
        self.starts[path] = i
        c = self.s[i]
        if c == '"':
            return self.string(i, path)
        if c == "{":
            return self.obj(i, path, depth)
        if c == "[":
            return self.arr(i, path, depth)
        m = _LITERAL.match(self.s, i)
        if m is None:
            hint = "; strings take double quotes" if c == "'" else ""
            raise self.fail(f"unexpected {c!r}: {_VALUE}{hint}", i, path)
        tok = m.group()
        if tok in _WORDS:
            return _WORDS[tok], m.end()
        num = _NUMBER.fullmatch(tok)
        if num is None:
            raise self.fail(f"invalid literal {tok!r}: expected a JSON number, true, false or null", i, path)
        if num.group(1) or num.group(2):
            return float(tok), m.end()
        try:
            return int(tok), m.end()
        except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
            raise self.fail(f"number with {len(tok)} digits is too long", i, path) from None

    def string(self, i: int, path: Path) -> tuple[str, int]:
        s, n = self.s, self.n
        j = _PLAIN.match(s, i + 1).end()  # type: ignore[union-attr]  # `*` always matches
        if j < n and s[j] == '"':
            return s[i + 1 : j], j + 1
        parts = [s[i + 1 : j]]
        while True:
            if j >= n:
                raise self.fail("unterminated string", i, path)
            c = s[j]
            if c == '"':
                return "".join(parts), j + 1
            if c == "\\":
                e = s[j + 1 : j + 2]
                if e == "u":
                    ch, j = self.unicode_escape(j, path)
                    parts.append(ch)
                elif e in _ESCAPES:
                    parts.append(_ESCAPES[e])
                    j += 2
                elif not e:
                    raise self.fail("unterminated string", i, path)
                else:
                    raise self.fail(f"bad escape {s[j : j + 2]!r} in a string", j, path)
            elif c == "\n":
                raise self.fail("unterminated string: it runs past the end of the line (write \\n)", i, path)
            else:
                raise self.fail(f"control character {c!r} in a string: write it as an escape", j, path)
            k = _PLAIN.match(s, j).end()  # type: ignore[union-attr]
            parts.append(s[j:k])
            j = k

    def unicode_escape(self, j: int, path: Path) -> tuple[str, int]:
        s = self.s
        if not _HEX4.fullmatch(s, j + 2, j + 6):
            raise self.fail("bad \\u escape: expected 4 hex digits", j, path)
        cp = int(s[j + 2 : j + 6], 16)
        if not 0xD800 <= cp <= 0xDFFF:
            return chr(cp), j + 6
        # As Go's encoding/json: a high surrogate escape then a low one is one character; any other is U+FFFD.
        if cp <= 0xDBFF and s.startswith("\\u", j + 6) and _HEX4.fullmatch(s, j + 8, j + 12):
            lo = int(s[j + 8 : j + 12], 16)
            if 0xDC00 <= lo <= 0xDFFF:
                return chr(0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00)), j + 12
        return "\ufffd", j + 6

    def obj(self, i: int, path: Path, depth: int) -> tuple[dict[str, Any], int]:
        s, n = self.s, self.n
        out: dict[str, Any] = {}
        i = self.skip(i + 1)
        while True:
            if i >= n:
                raise self.fail("unexpected end of file: expected a double-quoted key or '}'", i, path)
            c = s[i]
            if c == "}":
                return out, i + 1
            if c != '"':
                raise self.fail(f"unexpected {c!r}: expected a double-quoted key or '}}'", i, path)
            k = i
            key, i = self.string(i, path)
            kpath = (*path, key)
            if key in out:
                raise self.fail(f"duplicate key {key!r}", k, kpath)
            self.key_starts[kpath] = k
            i = self.skip(i)
            if i >= n or s[i] != ":":
                raise self.fail(f"expected ':' after key {key!r}", i, kpath)
            out[key], i = self.value(self.skip(i + 1), kpath, depth + 1)
            i = self.skip(i)
            if i < n and s[i] == ",":
                i = self.skip(i + 1)
            elif i < n and s[i] == "}":
                return out, i + 1
            else:
                raise self.fail("expected ',' or '}' after an object member", i, kpath)

    def arr(self, i: int, path: Path, depth: int) -> tuple[list[Any], int]:
        s, n = self.s, self.n
        out: list[Any] = []
        i = self.skip(i + 1)
        while True:
            if i >= n:
                raise self.fail("unexpected end of file: expected a value or ']'", i, path)
            if s[i] == "]":
                return out, i + 1
            v, i = self.value(i, (*path, len(out)), depth + 1)
            out.append(v)
            i = self.skip(i)
            if i < n and s[i] == ",":
                i = self.skip(i + 1)
            elif i < n and s[i] == "]":
                return out, i + 1
            else:
                raise self.fail("expected ',' or ']' after an array element", i, (*path, len(out) - 1))
