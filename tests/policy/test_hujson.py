"""The HuJSON reader: tailscale/hujson's own vectors, the ways policy text was read differently from how it was
checked (a commented-out rule applied, escaped keys mistaken for others), and hypothesis against json.loads."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coord.policy import PolicyError, parse
from coord.policy.hujson import MAX_DEPTH, load

from .hujson_cases import PARSE, POSITION_DIFFERS, STANDARDIZE


def json_value(std: bytes) -> tuple[bool, Any]:
    """What Tailscale gets from standardized HuJSON: (is it valid JSON, value)."""
    try:
        return True, json.loads(std.decode("utf-8"), parse_constant=_no_constant)
    except ValueError:
        return False, None


def _no_constant(name: str) -> Any:
    raise ValueError(name)


def byte_col(data: bytes, line: int, col: int) -> int:
    """Our character column as a byte column, Go's unit."""
    text = data.decode("utf-8", errors="replace")
    start = 0 if line == 1 else [m.end() for m in re.finditer("\n", text)][line - 2]
    return len(text[start : start + col - 1].encode("utf-8", errors="replace")) + 1


@pytest.mark.parametrize("data,std,err", PARSE, ids=[repr(c[0])[:40] for c in PARSE])
def test_sec_hujson_parse_vectors(data: bytes, std: bytes | None, err: tuple[int, int, str] | None) -> None:
    if std is not None:
        assert len(std) == len(data)  # standardizing only blanks bytes out: a check on the transcription
        ok, want = json_value(std)
        assert ok
        assert load(data).value == want
        return
    assert err is not None
    with pytest.raises(PolicyError) as e:
        load(data)
    if data not in POSITION_DIFFERS:
        assert (e.value.line, byte_col(data, e.value.line, e.value.col)) == err[:2], (str(e.value), err)


@pytest.mark.parametrize("data,out,eof", STANDARDIZE, ids=[repr(c[0])[:40] for c in STANDARDIZE])
def test_sec_hujson_standardizer_vectors(data: bytes, out: bytes, eof: bool) -> None:
    assert len(out) == len(data) or eof
    ok, want = json_value(out)
    if ok and not eof:
        assert load(data).value == want
    else:
        with pytest.raises(PolicyError):
            load(data)


ALLOW_ALICE = '{"action": "accept", "src": ["alice@example.com"], "dst": ["bob@example.com:22"]}'
ALLOW_ALL = '{"action": "accept", "src": ["*"], "dst": ["*:*"]}'


@pytest.mark.parametrize("sep", ["\r", "\u2028", "\u2029"], ids=["CR", "U+2028", "U+2029"])
def test_sec_commented_out_rule_stays_a_comment(sep: str) -> None:
    # json5 ended the comment at `sep` and applied the rest of the line; hujson (and Tailscale) end it at \n only.
    text = f'{{\n  "acls": [\n    {ALLOW_ALICE},\n    // old allow-all, disabled{sep}{ALLOW_ALL},\n  ],\n}}\n'
    p = parse(text)
    assert [(r.src, r.dst) for r in p.acls] == [(("alice@example.com",), ("bob@example.com:22",))]
    # A whole hidden second "acls" is a comment too, not a silent replacement of the first.
    text = f'{{\n  "acls": [{ALLOW_ALICE}],\n  // "acls": [...]{sep}"acls": [{ALLOW_ALL}],\n}}\n'
    assert parse(text).acls[0].src == ("alice@example.com",) and len(parse(text).acls) == 1
    # What follows `sep` on a comment line is never seen as syntax: an error in it is no error.
    assert load(f"[1, // x{sep}]]]\n2]").value == [1, 2]


def test_sec_line_comment_needs_its_newline() -> None:
    with pytest.raises(PolicyError) as e:
        load('{"acls": []}\n// the end')
    assert str(e.value).startswith("policy.hujson:2:1: unterminated // comment")
    assert load('{"acls": []}\n// the end\n').value == {"acls": []}
    assert load('{"acls": []}\n// the end\r\n').value == {"acls": []}


@pytest.mark.parametrize("esc,char", [("b", "\b"), ("f", "\f"), ("n", "\n"), ("r", "\r"), ("t", "\t")])
def test_sec_escaped_keys_are_their_own_keys(esc: str, char: str) -> None:
    # The indexer decoded `\n` in a key to `n`: a false duplicate of "an", and positions filed under "an".
    d = load(f'{{"a\\{esc}": {{"x": 1}},\n "a{esc}": 2}}')
    assert d.value == {f"a{char}": {"x": 1}, f"a{esc}": 2}
    assert d.where((f"a{char}", "x")) == (1, 15) and d.where((f"a{esc}",)) == (2, 8)
    assert d.key_starts[(f"a{char}", "x")] == 9 and d.key_starts[(f"a{esc}",)] == 19
    # A real duplicate, spelled two ways, is still one.
    with pytest.raises(PolicyError, match=r"^policy.hujson:1:12: .*duplicate key"):
        load(f'{{"a\\{esc}": 1, "a\\u{ord(char):04x}": 2}}')


def test_sec_escaped_keys_in_a_policy() -> None:
    # Before, this was refused as `duplicate key 'group:an'`; the two groups are different keys.
    text = '{"groups": {"group:a\\t": ["alice@example.com"], "group:at": ["bob@example.com"]}}'
    with pytest.raises(PolicyError) as e:
        parse(text)
    assert "duplicate" not in str(e.value) and str(e.value).startswith('policy.hujson:1:13: groups["group:a\\t"]')


def test_sec_surrogate_escapes_decode_as_go_does() -> None:
    assert load('"\\ud83d\\ude00"').value == "😀"
    assert load('{"\\uD83D\\uDE00": 1}').value == {"😀": 1}
    # Lone or misordered surrogates are U+FFFD (Go's encoding/json), never a string Python cannot encode.
    for text, want in [
        ('"\\ud800"', "\ufffd"),
        ('"\\udc00\\ud800"', "\ufffd\ufffd"),
        ('"\\ud800\\ud800\\udc00"', "\ufffd\U00010000"),
        ('"\\ud800x"', "\ufffdx"),
        ('"\\ud800\\u0041"', "\ufffdA"),
    ]:
        got = load(text).value
        assert got == want, text
        got.encode("utf-8")
    with pytest.raises(PolicyError, match="lone surrogate"):
        load('{"a": "\ud800"}')


@pytest.mark.parametrize(
    "text,where,reason",
    [
        ("{'acls': []}", "1:2", "double-quoted key"),
        ('{acls: []}', "1:2", "double-quoted key"),
        ('{"a": \'x\'}', "1:7: a", "strings take double quotes"),
        ('{"a": 0x10}', "1:7: a", "invalid literal '0x10'"),
        ('{"a": +1}', "1:7: a", "invalid literal '+1'"),
        ('{"a": .5}', "1:7: a", "invalid literal '.5'"),
        ('{"a": 1.}', "1:7: a", "invalid literal '1.'"),
        ('{"a": 01}', "1:7: a", "invalid literal '01'"),
        ('{"a": NaN}', "1:7: a", "invalid literal 'NaN'"),
        ('{"a": -Infinity}', "1:7: a", "invalid literal '-Infinity'"),
        ('{"a": nulls}', "1:7: a", "invalid literal 'nulls'"),
        ('{"a": "x\ty"}', "1:9: a", "control character"),
        ('{"a": "x\ny"}', "1:7: a", "unterminated string"),
        ('{"a": "\\x41"}', "1:8: a", "bad escape"),
        ('{"a": "\\u12"}', "1:8: a", "bad \\u escape"),
        ('{"a": 1,,}', "1:9", "double-quoted key"),
        ("[1,]\u00a0", "1:5", "after the end of the document"),
        ("\u2028[]", "1:1", "expected a value"),
        ("[]\v", "1:3", "after the end of the document"),
        ('{"a": 1} /* x', "1:10", "unterminated /* comment"),
        ("[" * (MAX_DEPTH + 2), f"1:{MAX_DEPTH + 2}", "nested deeper"),
    ],
)
def test_sec_refuses_what_hujson_refuses(text: str, where: str, reason: str) -> None:
    with pytest.raises(PolicyError) as e:
        load(text, "p")
    assert str(e.value).startswith(f"p:{where}"), str(e.value)
    assert reason in str(e.value)


def test_sec_not_utf8_names_its_place() -> None:
    with pytest.raises(PolicyError) as e:
        load(b'{\n  "a": "\xe9t\xe9"}')
    assert str(e.value) == "policy.hujson:2:9: not UTF-8: byte 10"


# -- hypothesis ---------------------------------------------------------------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
EXTRA = st.sampled_from(["", " ", "\n", "\t", "\r\n", "// c\n", "// \r x\u2028 y\n", "/* c\n */", "/**/", "/* // */"])


def hujson_text(draw: st.DrawFn, v: Any) -> str:
    """`v` written as HuJSON: comments and whitespace between any two tokens, trailing commas now and then."""

    def x() -> str:
        return draw(EXTRA)

    if isinstance(v, dict):
        members = [f"{x()}{json.dumps(k)}{x()}:{x()}{hujson_text(draw, e)}{x()}" for k, e in v.items()]
        trail = "," if members and draw(st.booleans()) else ""
        return "{" + ",".join(members) + trail + x() + "}"
    if isinstance(v, list):
        items = [f"{x()}{hujson_text(draw, e)}{x()}" for e in v]
        trail = "," if items and draw(st.booleans()) else ""
        return "[" + ",".join(items) + trail + x() + "]"
    return json.dumps(v, ensure_ascii=draw(st.booleans()))


@given(JSON, st.booleans(), st.sampled_from([None, 0, 2]))
def test_sec_fuzz_json_reads_as_json_loads(v: Any, ascii_only: bool, indent: int | None) -> None:
    text = json.dumps(v, ensure_ascii=ascii_only, indent=indent)
    assert load(text).value == json.loads(text)


@given(st.data(), JSON)
def test_sec_fuzz_hujson_reads_as_its_json(data: st.DataObject, v: Any) -> None:
    text = data.draw(st.sampled_from(["", " ", "// c\n"])) + hujson_text(data.draw, v) + "\n"
    assert load(text).value == json.loads(json.dumps(v))


ALPHABET = st.sampled_from([*'{}[]:,"\\/*-+.0123456789eEtruefalsnxu \t\r\n\u2028\'', "ud83d", "ude00", "//"])


def strict_json(text: str) -> Any:
    """json.loads with our rules on top: no duplicates, no NaN/Infinity, lone surrogates as U+FFFD."""

    def fix(v: Any) -> Any:
        if isinstance(v, str):
            return re.sub("[\ud800-\udfff]", "\ufffd", v)
        if isinstance(v, list):
            return [fix(e) for e in v]
        if isinstance(v, dict):
            return {fix(k): fix(e) for k, e in v.items()}
        return v

    def pairs(kv: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(kv)
        if len({fix(k) for k in out}) < len(kv):
            raise ValueError("duplicate key")
        return out

    return fix(json.loads(text, object_pairs_hook=pairs, parse_constant=_no_constant))


def depth(v: Any) -> int:
    if isinstance(v, dict):
        return 1 + max(map(depth, v.values()), default=0)
    if isinstance(v, list):
        return 1 + max(map(depth, v), default=0)
    return 0


@given(st.one_of(st.text(max_size=200), st.lists(ALPHABET, max_size=60).map("".join), st.binary(max_size=200)))
def test_sec_fuzz_reader_raises_only_policy_error(data: str | bytes) -> None:
    try:
        v = load(data).value
    except PolicyError:
        pass
    else:
        assert json.loads(json.dumps(v)) == v  # whatever it accepts is plain JSON data
    if isinstance(data, bytes):
        return
    try:
        want = strict_json(data)
    except (ValueError, RecursionError):
        return
    if depth(want) <= MAX_DEPTH and "\ufeff" not in data[:1]:
        assert load(data).value == want  # valid JSON (on our rules) is read as json.loads reads it
