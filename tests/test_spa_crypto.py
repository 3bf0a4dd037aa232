"""AES key derivation, modes, padding and the plaintext fields, as libfko does them."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nfknock.spa import reasons as R
from nfknock.spa.crypto import (
    MODES,
    b64decode_nopad,
    b64encode_nopad,
    decrypt,
    derive_key_iv,
    encrypt,
    pad,
    passphrase,
    strip_padding,
)
from nfknock.spa.message import (
    MessageType,
    build_plaintext,
    parse_fields,
    parse_plaintext,
)

from .spa_support import NOW, message

# `openssl enc -aes-256-cbc -md md5 -pass pass:nfknock-test-passphrase
#  -S 0102030405060708 -P` (OpenSSL 3.0, Debian 12), and the ciphertext of
# "hello fwknop" by the same command without -P.
OPENSSL_PASS = b"nfknock-test-passphrase"
OPENSSL_SALT = bytes.fromhex("0102030405060708")
OPENSSL_KEY = bytes.fromhex("44E50E7480004040437457C058A710DFB2FB14F1C89D9D7DD37315F030CB5A1F")
OPENSSL_IV = bytes.fromhex("C95F1AB21519B9CCD5F28EB7D9048569")
OPENSSL_CT = base64.b64decode("Yy1xgyE9bFrf9SSKCdPoMA==")


def test_key_derivation_is_openssl_evp_bytes_to_key_md5() -> None:
    assert derive_key_iv(OPENSSL_PASS, OPENSSL_SALT) == (OPENSSL_KEY, OPENSSL_IV)


def test_cbc_encryption_matches_openssl_enc() -> None:
    blob = encrypt(OPENSSL_PASS, b"hello fwknop", "cbc", OPENSSL_SALT)
    assert blob == b"Salted__" + OPENSSL_SALT + OPENSSL_CT
    assert decrypt(OPENSSL_PASS, blob, "cbc") == b"hello fwknop"


def test_legacy_pads_short_keys_with_ascii_zero_and_cuts_long_ones() -> None:
    assert passphrase(b"abc", "legacy") == b"abc" + b"0" * 13
    assert passphrase(bytes(range(32)), "legacy") == bytes(range(16))
    assert passphrase(b"abc", "cbc") == b"abc"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 100])
def test_every_mode_round_trips_with_padding_to_whole_blocks(mode: str, size: int) -> None:
    plain = bytes(range(size))
    blob = encrypt(b"k" * 32, plain, mode, b"saltsalt")
    assert (len(blob) - 16) % 16 == 0 and len(blob) - 16 > size
    assert decrypt(b"k" * 32, blob, mode) == plain


@pytest.mark.parametrize(
    "blob", [b"", b"Salted__saltsalt", b"Salted__saltsalt" + b"x" * 15, b"Peppered" + b"x" * 24]
)
def test_a_blob_that_is_not_salted_whole_blocks_is_bad_ciphertext(blob: bytes) -> None:
    with pytest.raises(R.SpaError) as exc:
        decrypt(b"k" * 32, blob, "cbc")
    assert exc.value.code == R.BAD_CIPHERTEXT


@pytest.mark.parametrize(
    ("data", "stripped"),
    [
        (b"abc" + b"\x0d" * 13, b"abc"),
        (b"\x10" * 16, b""),
        (b"abc\x00", b"abc\x00"),  # 0: nothing to strip (rij_decrypt)
        (b"abc\x02\x03", b"abc\x02\x03"),  # inconsistent: kept whole
        (b"abc\x11", b"abc\x11"),  # above a block: kept
        (b"", b""),
    ],
)
def test_padding_is_stripped_only_when_consistent(data: bytes, stripped: bytes) -> None:
    assert strip_padding(data) == stripped


@given(st.binary(max_size=64))
def test_pad_then_strip_is_identity(data: bytes) -> None:
    assert strip_padding(pad(data)) == data


def test_base64_without_padding_round_trips_and_refuses_impossible_lengths() -> None:
    for n in range(8):
        assert b64decode_nopad(b64encode_nopad(bytes(n))) == bytes(n)
    with pytest.raises(ValueError):
        b64decode_nopad(b"AAAAA")


# --- the plaintext ----------------------------------------------------------------


def test_the_documented_example_plaintext_parses() -> None:
    # /work/shared/spa-fwknop.md: a default fwknop 2.6.10 plaintext.
    plain = (
        b"1130682662203333:cm9vdA:1795497852:3.0.0:1:MTAuMS4yLjMsdGNwLzIy:"
        b"47/L+zCj6awA5sCWSfetsmulufQSYMLsaoNFfs+bqKo"
    )
    msg = parse_plaintext(plain)
    assert (msg.username, msg.timestamp, msg.version) == ("root", 1795497852, "3.0.0")
    assert msg.message_type == MessageType.ACCESS
    assert (msg.allow_ip, msg.access, msg.digest_type) == ("10.1.2.3", (("tcp", 22),), "sha256")


@pytest.mark.parametrize(
    ("kw", "check"),
    [
        ({}, lambda m: m.server_auth is None and m.client_timeout is None),
        ({"server_auth": "crypt,xyz"}, lambda m: m.server_auth == "crypt,xyz"),
        (
            {"message_type": MessageType.CLIENT_TIMEOUT_ACCESS, "client_timeout": 45},
            lambda m: m.client_timeout == 45,
        ),
        (
            {
                "message_type": MessageType.CLIENT_TIMEOUT_NAT_ACCESS,
                "client_timeout": 45,
                "nat_access": ("internal.example", 2222),
                "server_auth": "pw",
            },
            lambda m: m.nat_access == ("internal.example", 2222) and m.server_auth == "pw",
        ),
        (
            {"message_type": MessageType.COMMAND, "access": (), "command": "uname -a"},
            lambda m: m.command == "uname -a" and m.access == (),
        ),
        (
            {"access": (("tcp", 22), ("udp", 53), ("icmp", 1))},
            lambda m: m.access_text() == ["tcp/22", "udp/53", "icmp/1"],
        ),
    ],
)
def test_built_messages_parse_back(kw: dict[str, object], check: object) -> None:
    msg = message(**kw)
    parsed = parse_plaintext(build_plaintext(msg))
    assert parsed == msg
    assert check(parsed)  # type: ignore[operator]


def _fields(**over: str) -> list[str]:
    base = {
        "rand": "1234567890123456",
        "user": "YWxpY2U",  # alice
        "ts": str(NOW),
        "version": "3.0.0",
        "type": "1",
        "message": "MC4wLjAuMCx0Y3AvMjI",  # 0.0.0.0,tcp/22
    }
    base.update(over)
    return list(base.values())


def _b64(text: str) -> str:
    return b64encode_nopad(text.encode()).decode()


@pytest.mark.parametrize(
    "fields",
    [
        _fields()[:5],
        _fields(rand="123"),
        _fields(rand="123456789012345x"),
        _fields(user=""),
        _fields(user="!!!"),
        _fields(user=_b64("a/b")),
        _fields(user=_b64("x" * 49)),
        _fields(ts=""),
        _fields(ts="-5"),
        _fields(ts="1" * 13),
        _fields(ts="١٢٣"),  # Arabic-Indic digits: str.isdigit, not ASCII
        _fields(ts="²"),
        _fields(version=""),
        _fields(version="123456789"),
        _fields(type="7"),
        _fields(type="x"),
        _fields(type="001"),
        _fields(message=""),
        _fields(message=_b64("0.0.0.0")),
        _fields(message=_b64("0.0.0.0,")),
        _fields(message=_b64("0.0.0.0,tcp/")),
        _fields(message=_b64("0.0.0.0,tcp/0")),
        _fields(message=_b64("0.0.0.0,tcp/65536")),
        _fields(message=_b64("0.0.0.0,tcp/123456")),
        _fields(message=_b64("0.0.0.0,sctp/22")),
        _fields(message=_b64("0.0.0.0,tcp/22,")),
        _fields(message=_b64("0.0.0.0,tcp-22")),
        _fields(message=_b64("1.2.3.400,tcp/22")),
        _fields(message=_b64("::1,tcp/22")),
        _fields(message=_b64("0.0.0.0,tcp/2\x012")),
        [*_fields(), "c2E", "extra"],  # ACCESS: at most one optional field
        _fields(type="3"),  # CLIENT_TIMEOUT_ACCESS without its timeout
        [*_fields(type="3"), "12a"],
        [*_fields(type="3"), "99999999"],
        _fields(type="2"),  # NAT without nat_access
        [*_fields(type="2"), _b64("host")],
        [*_fields(type="2"), _b64("ho st,22")],
        [*_fields(type="2"), _b64("host,22,23")],
        [*_fields(type="0", message=_b64("0.0.0.0,"))],
    ],
)
def test_malformed_fields_are_refused_as_bad_fields(fields: list[str]) -> None:
    with pytest.raises(R.SpaError) as exc:
        parse_fields(fields)
    assert exc.value.code == R.BAD_FIELDS


def test_the_decryption_check_is_sixteen_digits_then_a_colon() -> None:
    good = build_plaintext(message(rand="1234567890123456"))
    assert parse_plaintext(good).rand == "1234567890123456"
    for bad in (b"123456789012345a:" + good[17:], b"1234567890123456;" + good[17:], b"1" * 16):
        with pytest.raises(R.SpaError) as exc:
            parse_plaintext(bad)
        assert exc.value.code == R.DECRYPT_FAILED


def test_a_non_printable_plaintext_is_bad_fields() -> None:
    good = build_plaintext(message())
    with pytest.raises(R.SpaError) as exc:
        parse_plaintext(good + b"\x04\x04\x04\x04")
    assert exc.value.code == R.BAD_FIELDS


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_any_plaintext_parses_or_raises_spa_error(data: bytes) -> None:
    try:
        parse_plaintext(data)
    except R.SpaError as exc:
        assert exc.code in R.CODES


@settings(max_examples=300)
@given(st.lists(st.text(max_size=30), max_size=10))
def test_any_field_list_parses_or_raises_spa_error(fields: list[str]) -> None:
    try:
        parse_fields(fields)
    except R.SpaError as exc:
        assert exc.code == R.BAD_FIELDS


def test_an_unknown_code_cannot_be_raised() -> None:
    with pytest.raises(ValueError):
        R.SpaError("spa_made_up")
    with pytest.raises(ValueError):
        R.SpaError(R.ACCEPTED)


def test_the_encoder_imports_nothing_of_the_daemon() -> None:
    """nfknock-client imports the encoder: standard library and cryptography only."""
    import json
    import subprocess
    import sys

    code = (
        "import json, sys, nfknock.spa.encode; "
        "print(json.dumps([m for m in sys.modules if m.startswith(('nfknock', "
        "'netfilterqueue', 'structlog', 'toml', 'segno'))]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    loaded = set(json.loads(out))
    assert loaded <= {
        "nfknock",
        "nfknock.spa",
        "nfknock.spa.crypto",
        "nfknock.spa.encode",
        "nfknock.spa.message",
        "nfknock.spa.reasons",
        "nfknock.spa.wire",
    }, loaded
