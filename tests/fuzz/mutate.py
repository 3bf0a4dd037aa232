"""Hypothesis strategies that damage input files the way the issue-15 run did.

A mutation starts from a valid *seed* file and applies a few edits: byte flips,
deletions and duplications (the blind fuzzer), and TOML-aware edits that swap a
value for a nasty one (wrong type, huge number, deep nesting, odd unicode, an
unusable path) or insert nasty lines.  Every edit is small, so most mutants stay
close to valid and reach the validation code, not only the TOML parser.
"""

from __future__ import annotations

from hypothesis import strategies as st

LONG_NAME = "n" * 300
NASTY_PATHS = [
    "",
    "/",
    ".",
    "/etc/passwd/x",
    "/proc/self/mem",
    "/sys/kernel",
    "/dev/null",
    "/dev/zero",
    f"/tmp/{LONG_NAME}/x",
    "/" + "a/" * 3000,
    "/nonexistent/dir/file",
    "relative/../../x",
    "nul\\u0000byte",
    "~root/x",
    "/run/" + "s" * 120,
]
NASTY_STRINGS = [
    "",
    " ",
    "\\n",
    "\\u0000",
    "\\u202e\\u0644\\u0627",  # right-to-left override, Arabic
    "\\ufeff",  # a BOM inside a value
    "e\\u0301",  # a combining accent
    "\\U0001f600" * 40,
    "x" * 5000,
    "%s%n%x",
    "'; DROP TABLE users; --",
    "alice\\n",
]
NASTY_VALUES = [
    "0",
    "-1",
    "-0",
    "1" + "0" * 400,  # larger than any machine integer
    "-9223372036854775809",
    "0x7fffffffffffffff",
    "0b1",
    "1e400",  # +Infinity once parsed
    "-1e400",
    "inf",
    "-inf",
    "nan",
    "3.5",
    "true",
    "false",
    "1979-05-27T07:32:00Z",
    "07:32:00",
    "[]",
    "[1, 2, 3]",
    "[1, 'a', true]",
    "[[1], [2]]",
    "{}",
    "{a = 1}",
    "[" * 40 + "]" * 40,
    "[" * 3000 + "]" * 3000,
    "{a = " * 3000 + "1" + "}" * 3000,
    "[" + ", ".join(["65535"] * 2000) + "]",
    "[70000, 0, -1]",
    *[f'"{s}"' for s in NASTY_STRINGS],
    *[f'"{p}"' for p in NASTY_PATHS],
]
NASTY_LINES = [
    "[knock]",
    "[[protect]]",
    "[[allow]]",
    "[users.x]",
    "[users]",
    "[state]",
    "[control]",
    "[spa]",
    "[queue]",
    'network = "0.0.0.0/0"',
    'network = "::/0"',
    "port = 22",
    "length = 1",
    'secret = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"',
    'scheme = "kommen"',
    'scheme = "livingstone"',
    "a = " + "[" * 3000 + "]" * 3000,
    "[" * 2000,
    "x.y.z.w = 1",
    '"" = 1',
    '"\\u0000" = 1',
    "= 1",
]


@st.composite
def _edit(draw: st.DrawFn, data: bytes) -> bytes:
    kind = draw(
        st.sampled_from(["flip", "delete", "duplicate", "value", "line", "truncate", "bytes"])
    )
    if not data and kind in ("flip", "delete", "duplicate", "truncate"):
        kind = "line"
    if kind == "flip":
        i = draw(st.integers(0, len(data) - 1))
        bit = draw(st.integers(0, 7))
        return data[:i] + bytes([data[i] ^ (1 << bit)]) + data[i + 1 :]
    if kind == "delete":
        i = draw(st.integers(0, len(data) - 1))
        n = draw(st.integers(1, 16))
        return data[:i] + data[i + n :]
    if kind == "duplicate":
        i = draw(st.integers(0, len(data) - 1))
        n = draw(st.integers(1, 64))
        return data[:i] + data[i : i + n] * draw(st.integers(2, 4)) + data[i:]
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data)))]
    if kind == "bytes":
        i = draw(st.integers(0, len(data)))
        return data[:i] + draw(st.binary(min_size=1, max_size=8)) + data[i:]
    lines = data.split(b"\n")
    if kind == "value":
        slots = [n for n, line in enumerate(lines) if b"=" in line and not line.startswith(b"#")]
        if slots:
            n = draw(st.sampled_from(slots))
            key = lines[n].split(b"=", 1)[0]
            lines[n] = key + b"= " + draw(st.sampled_from(NASTY_VALUES)).encode()
            return b"\n".join(lines)
    n = draw(st.integers(0, len(lines)))
    lines.insert(n, draw(st.sampled_from(NASTY_LINES)).encode())
    return b"\n".join(lines)


@st.composite
def mutated(draw: st.DrawFn, seed: bytes, max_edits: int = 4) -> bytes:
    """``seed`` after 1..``max_edits`` random edits."""
    data = seed
    for _ in range(draw(st.integers(1, max_edits))):
        data = draw(_edit(data))
    return data
