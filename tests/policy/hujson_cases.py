"""tailscale/hujson's published test vectors, transcribed (BSD-3-Clause, Tailscale Inc & AUTHORS).

PARSE is the table of `json_test.go` (Parse): an input and either its standardized form (comments and trailing
commas blanked out; valid JSON) or Go's error position, line and column in bytes, with Go's message.
STANDARDIZE is the table of `standardizer_test.go` (the streaming Standardizer): an input, its output, and
whether the stream ended in an error (an unterminated comment). The Standardizer blanks comments without
validating the rest, so hujson's Parse accepts an input there exactly when there is no error and the output
is valid JSON.
"""

from __future__ import annotations

# (input, standardized output or None, (line, byte column, Go's message) or None)
PARSE: list[tuple[bytes, bytes | None, tuple[int, int, str] | None]] = [
    (b" null ", b" null ", None),
    (b" null,", None, (1, 6, "invalid character ',' after top-level value")),
    (
        "//😊 \r\t\n/*\r\t\n*/null//😊 \r\t\n/*\r\t\n*/".encode(),
        b"       \r\t\n  \r\t\n  null       \r\t\n  \r\t\n  ",
        None,
    ),
    (b"/?", None, (1, 1, "invalid character '/' at start of value")),
    (b"//\xde\xad\xbe\xef\nnull", None, (1, 1, "invalid UTF-8 in comment")),
    (b"null//", None, (1, 5, "parsing comment: unexpected EOF")),
    (b"null//\n", b"null  \n", None),
    ('"\\"\\\\\\u0022😊'.encode(), None, (1, 16, "parsing string: unexpected EOF")),
    (b'"\\xff"', None, (1, 1, 'invalid literal: "\\xff"')),
    ('"\\"\\\\\\u0022😊"'.encode(), '"\\"\\\\\\u0022😊"'.encode(), None),
    (b"3.14159E+435", b"3.14159E+435", None),
    (b"+1000", None, (1, 1, "invalid literal: +1000")),
    (b"{", None, (1, 2, "parsing value: unexpected EOF")),
    (b"{,}", None, (1, 2, "invalid character ',' at start of value")),
    (b'{null:"v"', None, (1, 2, "invalid character 'n' at start of object name")),
    (b'{"k"', None, (1, 5, "parsing object after name: unexpected EOF")),
    (b'{"k";', None, (1, 5, "invalid character ';' after object name")),
    (b'{"k":}', None, (1, 6, "invalid character '}' at start of value")),
    (b'{"k":"v"', None, (1, 9, "parsing object after value: unexpected EOF")),
    (b'{"k":"v"]', None, (1, 9, "invalid character ']' after object value (expecting ',' or '}')")),
    (b' { "k" : "v" } ', b' { "k" : "v" } ', None),
    (b' { "k" : "v" , } ', b' { "k" : "v"   } ', None),
    (b"[", None, (1, 2, "parsing value: unexpected EOF")),
    (b"[,]", None, (1, 2, "invalid character ',' at start of value")),
    (b'["s"', None, (1, 5, "parsing array after value: unexpected EOF")),
    (b'["s"}', None, (1, 5, "invalid character '}' after array value (expecting ',' or ']')")),
    (b' [ "s" ] ', b' [ "s" ] ', None),
    (b' [ "s" , ] ', b' [ "s"   ] ', None),
    (
        b' /**/ [ /**/ null /**/ , /**/ false /**/ , /**/ true /**/ , /**/ "string" /**/ , /**/ 0 /**/ ,'
        b" /**/ {} /**/ , /**/ [] /**/ ] /**/ ",
        b'      [      null      ,      false      ,      true      ,      "string"      ,      0      ,'
        b"      {}      ,      []      ]      ",
        None,
    ),
    (b" \xff", None, (1, 2, "invalid character '\\xff' at start of value")),
    (b" '", None, (1, 2, "invalid character '\\'' at start of value")),
    (" 💩".encode(), None, (1, 2, "invalid character '💩' at start of value")),
    (" \uffff".encode(), None, (1, 2, "invalid character '\\uffff' at start of value")),
    (" \U00101234".encode(), None, (1, 2, "invalid character '\\U00101234' at start of value")),
]

# Where our error points elsewhere than Go's, and why (the input is refused either way).
POSITION_DIFFERS = {
    b"//\xde\xad\xbe\xef\nnull": "we name the first byte that is not UTF-8, Go the comment holding it",
    '"\\"\\\\\\u0022😊'.encode(): "we point at the quote that opens the unterminated string, Go at the end of file",
    b'"\\xff"': "we point at the bad escape, Go at the string holding it",
}

_JWCC = b'/**/ [ /**/ { /**/ "k" /**/ : /**/ "v" /**/ , /*x*/ } /**/ , /**/ 0 /**/ , /*x*/ ] /**/'
_POO = "💩".encode()

# (input, Standardizer output, ended in error)
STANDARDIZE: list[tuple[bytes, bytes, bool]] = [
    (b"", b"", False),
    (b"/", b"", True),
    (b"/ ", b"/ ", False),
    (b"//", b"  ", True),
    (b"//\n", b"  \n", False),
    (b"//*\n", b"   \n", False),
    (b" \n\r\t", b" \n\r\t", False),
    (b"//x\xff\xffx\n", b"   \xff\xff \n", False),
    ((b"//" + _POO + b"\n")[:3], b"  ", True),
    ((b"//" + _POO + b"\n")[:4], b"  ", True),
    ((b"//" + _POO + b"\n")[:5], b"  ", True),
    ((b"//" + _POO + b"\n")[:6], b"      ", True),
    ((b"//" + _POO + b"\n")[:7], b"      \n", False),
    (b"/*", b"  ", True),
    (b"/**", b"  ", True),
    (b"/**/", b"    ", False),
    (b"/***/", b"     ", False),
    (b"/****/", b"      ", False),
    (b"/**?", b"    ", True),
    (b"/*\n*/", b"  \n  ", False),
    (b"/*x\xff\xffx*/", b"   \xff\xff   ", False),
    ((b"/*" + _POO + b"*/")[:3], b"  ", True),
    ((b"/*" + _POO + b"*/")[:4], b"  ", True),
    ((b"/*" + _POO + b"*/")[:5], b"  ", True),
    ((b"/*" + _POO + b"*/")[:6], b"      ", True),
    ((b"/*" + _POO + b"*/")[:7], b"      ", True),
    ((b"/*" + _POO + b"*/")[:8], b"        ", False),
    (b'"', b'"', False),
    (b'""', b'""', False),
    (b'"\\""', b'"\\""', False),
    (b'"\\""//\n', b'"\\""  \n', False),
    (b'"\\"/**/"', b'"\\"/**/"', False),
    (b",", b",", False),
    (b",]", b",]", False),
    (b"[,", b"[,", False),
    (b"[,]", b"[,]", False),
    (b"[a,", b"[a", True),
    (b"[a,]", b"[a ]", False),
    (b"[{},", b"[{}", True),
    (b"[{},]", b"[{} ]", False),
    (b'[["",],{},]', b'[["" ],{} ]', False),
    (
        b'{"hello":"goodbye", /*\nfizz\n*/ // buzz\n }',
        b'{"hello":"goodbye"    \n    \n          \n }',
        False,
    ),
    (_JWCC, _JWCC.replace(b"/**/", b"    ").replace(b", /*x*/", b"       "), False),
]
