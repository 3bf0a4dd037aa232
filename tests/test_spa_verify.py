"""The SPA verifier: every check, its order, its reason code (issue 10 items 2-3)."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nfknock.spa import reasons as R
from nfknock.spa.crypto import HMAC_DIGESTS, MODES, b64encode_nopad, encrypt
from nfknock.spa.message import MessageType, build_plaintext
from nfknock.spa.replay import ReplayCache
from nfknock.spa.wire import SALTED_B64

from .spa_support import (
    DST,
    HMAC_KEY,
    KEY,
    NOW,
    OTHER_KEY,
    SRC,
    SRC2,
    SRC6,
    client,
    ip,
    message,
    packet,
    sealed,
    spa_user,
    verifier,
    with_tag,
)


def code(payload: bytes, *users: object, src: bytes | None = SRC, wall: float = NOW) -> str:
    return verifier(*users).verify(src, DST, payload, wall).code  # type: ignore[arg-type]


def test_a_valid_packet_is_accepted_with_what_it_asked_for() -> None:
    result = verifier().verify(SRC, DST, packet(), NOW)
    assert result.ok and result.code == R.ACCEPTED
    assert result.user == "alice"
    assert result.ports == frozenset({22})
    assert result.open_address == SRC
    assert result.allow_ip == "0.0.0.0"
    assert result.timestamp == NOW
    assert result.message_type == MessageType.ACCESS
    assert result.timeout is None
    assert result.authenticated and not result.replay_checked


def test_the_replay_digest_is_the_sha256_of_the_payload() -> None:
    p = packet()
    assert verifier().verify(SRC, DST, p, NOW).replay_digest == hashlib.sha256(p).digest()


# --- shape --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"A" * 139, R.TOO_SHORT),
        (b"", R.TOO_SHORT),
        (b"A" * 1501, R.TOO_LONG),
        (b"U2FsdGVkX1" + b"A" * 200, R.SALTED_PREFIX),
        (b"A" * 199 + b"=", R.BAD_BASE64),
        (b"A" * 199 + b"-", R.BAD_BASE64),
        (b"A" * 100 + b" " + b"A" * 99, R.BAD_BASE64),
        (b"A" * 199 + b"\xff", R.BAD_BASE64),
        (b"A" * 140, R.NO_HMAC_MATCH),
        (b"A" * 1500, R.NO_HMAC_MATCH),
    ],
)
def test_shape_checks_come_first(payload: bytes, expected: str) -> None:
    assert code(payload) == expected


def test_a_seen_packet_behind_the_salted_prefix_is_refused_before_any_user() -> None:
    assert code(SALTED_B64 + packet()) == R.SALTED_PREFIX


# --- candidates and the HMAC --------------------------------------------------------


def test_no_fwknop_user_means_no_candidate() -> None:
    from nfknock.config import SpaConfig
    from nfknock.spa.verify import Verifier

    v = Verifier([], SpaConfig(), frozenset({22}))
    assert v.verify(SRC, DST, packet(), NOW).code == R.NO_USER_FOR_SOURCE


def test_spa_sources_limit_who_may_use_a_user() -> None:
    import ipaddress

    user = spa_user(sources=(ipaddress.ip_network("198.51.100.10/32"),))
    assert code(packet(), user, src=SRC) == R.ACCEPTED
    assert code(packet(), user, src=SRC2) == R.NO_USER_FOR_SOURCE
    assert code(packet(), user, src=SRC6) == R.NO_USER_FOR_SOURCE
    # spa inspect without --source: the filter cannot apply.
    assert code(packet(), user, src=None) == R.ACCEPTED


@pytest.mark.parametrize(
    "bad",
    [
        {"hmac_key": OTHER_KEY},
        {"hmac_digest": "sha512"},
        {"hmac_digest": "sha3_256"},  # same tag length as sha256, other function
    ],
)
def test_a_wrong_hmac_key_or_digest_is_no_hmac_match(bad: dict[str, object]) -> None:
    assert code(packet(client(**bad))) == R.NO_HMAC_MATCH


def test_a_tag_spelled_non_canonically_is_no_hmac_match() -> None:
    p = packet()
    # 32-byte SHA-256 tag = 43 characters; the last one carries 2 unused bits.
    last = p[-1:]
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    twin = alphabet[alphabet.index(last) ^ 1 : (alphabet.index(last) ^ 1) + 1]
    assert code(p) == R.ACCEPTED
    assert code(p[:-1] + twin) == R.NO_HMAC_MATCH


def test_every_character_of_a_packet_is_authenticated() -> None:
    p = packet()
    for i in range(len(p)):
        flipped = p[:i] + (b"B" if p[i : i + 1] != b"B" else b"C") + p[i + 1 :]
        assert code(flipped) in (R.NO_HMAC_MATCH, R.SALTED_PREFIX), i


# --- decryption, digest, fields -----------------------------------------------------


def test_a_wrong_encryption_key_is_decrypt_failed() -> None:
    assert code(packet(client(key=OTHER_KEY))) == R.DECRYPT_FAILED


@pytest.mark.parametrize("mode", [m for m in MODES if m not in ("cbc", "legacy")])
def test_a_mode_mismatch_is_decrypt_failed(mode: str) -> None:
    assert code(packet(client(mode=mode))) == R.DECRYPT_FAILED
    assert code(packet(client(mode=mode)), spa_user(mode=mode)) == R.ACCEPTED


def test_an_authenticated_ciphertext_of_partial_blocks_is_bad_ciphertext() -> None:
    ciphertext = packet()[:-43]
    assert code(with_tag(ciphertext[:-4])) == R.BAD_CIPHERTEXT


def test_an_authenticated_blob_without_salted_marker_is_bad_ciphertext() -> None:
    blob = encrypt(KEY, build_plaintext(message()), "cbc", b"12345678")
    # The ten stripped characters fix "Salted_" and half of the eighth byte: the
    # other half (the 11th character's top bits) is the only freedom left.
    forged = b64encode_nopad(b"Salted_P" + blob[8:])
    assert forged.startswith(SALTED_B64)
    assert code(with_tag(forged[10:])) == R.BAD_CIPHERTEXT


def _sealed_plain(plain: bytes) -> bytes:
    text = b64encode_nopad(encrypt(KEY, plain, "cbc", b"saltsalt"))
    return with_tag(text[10:])


def test_a_wrong_inner_digest_is_bad_digest() -> None:
    plain = build_plaintext(message())
    body, _, digest = plain.rpartition(b":")
    wrong = body + b":" + (b"A" if digest[:1] != b"A" else b"B") + digest[1:]
    assert code(_sealed_plain(wrong)) == R.BAD_DIGEST


def test_a_digest_of_unknown_length_is_bad_digest() -> None:
    plain = build_plaintext(message())
    assert code(_sealed_plain(plain[:-1])) == R.BAD_DIGEST


@pytest.mark.parametrize("digest", list(HMAC_DIGESTS))
def test_every_inner_digest_type_is_recognised(digest: str) -> None:
    result = verifier().verify(SRC, DST, packet(digest=digest), NOW)
    assert result.ok and result.message is not None
    assert result.message.digest_type == digest


def test_malformed_fields_are_bad_fields() -> None:
    assert code(sealed(message(access=(("tcp", 0),)))) == R.BAD_FIELDS
    assert code(sealed(message(allow_ip="1.2.3"))) == R.BAD_FIELDS
    assert code(sealed(message(username="a:b"))) == R.BAD_FIELDS


# --- replay -----------------------------------------------------------------------


def test_a_replay_is_refused_from_any_source() -> None:
    v, cache, p = verifier(), ReplayCache(1024, 241), packet()
    first = v.verify(SRC, DST, p, NOW, replay=cache)
    assert first.ok and first.replay_checked
    assert v.verify(SRC, DST, p, NOW + 1, replay=cache).code == R.REPLAY
    assert v.verify(SRC2, DST, p, NOW + 1, replay=cache).code == R.REPLAY


def test_without_a_replay_guard_nothing_is_recorded() -> None:
    v, p = verifier(), packet()
    assert v.verify(SRC, DST, p, NOW).ok
    assert v.verify(SRC, DST, p, NOW).ok


def test_an_authenticated_packet_refused_later_is_still_recorded() -> None:
    v, cache = verifier(), ReplayCache(1024, 241)
    p = packet(access=(("tcp", 80),))
    assert v.verify(SRC, DST, p, NOW, replay=cache).code == R.PORT_NOT_ALLOWED
    assert v.verify(SRC, DST, p, NOW, replay=cache).code == R.REPLAY


def test_a_packet_from_the_future_is_still_a_replay_when_its_window_comes() -> None:
    """Stamped 200 s ahead, it is refused now but good from 80 s to 320 s from now:
    remembering it only 2 x max_age + 1 s (241 s) would let a sniffed copy in after."""
    v, cache = verifier(), ReplayCache.for_max_age(1024, 120)
    p = packet(timestamp=NOW + 200, allow_ip="0.0.0.0")
    assert v.verify(SRC, DST, p, NOW, replay=cache).code == R.FROM_FUTURE
    for later in (100, 250, 320):
        assert v.verify(SRC2, DST, p, NOW + later, replay=cache).code == R.REPLAY, later


def test_unauthenticated_packets_never_reach_the_replay_cache() -> None:
    v, cache = verifier(), ReplayCache(1024, 241)
    assert v.verify(SRC, DST, packet(client(hmac_key=OTHER_KEY)), NOW, replay=cache).code == (
        R.NO_HMAC_MATCH
    )
    assert len(cache) == 0


def test_a_full_replay_cache_fails_closed() -> None:
    v, cache = verifier(), ReplayCache(1, 241)
    assert v.verify(SRC, DST, packet(), NOW, replay=cache).ok
    assert v.verify(SRC, DST, packet(), NOW, replay=cache).code == R.REPLAY_CACHE_FULL


def test_two_users_with_the_same_keys_claim_the_packet_once() -> None:
    v = verifier(spa_user("alice", username="nobody"), spa_user("bob"))
    cache = ReplayCache(1024, 241)
    result = v.verify(SRC, DST, packet(), NOW, replay=cache)
    assert result.ok and result.user == "bob"
    assert len(cache) == 1


# --- admission ---------------------------------------------------------------------


def test_a_disabled_user_is_refused_after_authentication() -> None:
    user = replace(spa_user(), enabled=False)
    assert code(packet(), user) == R.USER_DISABLED


@pytest.mark.parametrize(
    ("offset", "expected"),
    [
        (120, R.ACCEPTED),
        (121, R.TOO_OLD),
        (200, R.TOO_OLD),
        (-120, R.ACCEPTED),
        (-121, R.FROM_FUTURE),
        (-200, R.FROM_FUTURE),
    ],
)
def test_the_timestamp_window_is_max_age_both_ways(offset: int, expected: str) -> None:
    assert code(packet(), wall=NOW + offset) == expected


def test_max_age_comes_from_the_spa_config() -> None:
    v = verifier(max_age=30)
    assert v.verify(SRC, DST, packet(), NOW + 30.9).ok
    assert v.verify(SRC, DST, packet(), NOW + 31).code == R.TOO_OLD


def test_a_required_username_must_match() -> None:
    assert code(packet(), spa_user(username="alice")) == R.ACCEPTED
    assert code(packet(), spa_user(username="root")) == R.USERNAME_MISMATCH


def test_command_messages_are_refused_never_executed() -> None:
    msg = message(message_type=MessageType.COMMAND, access=(), command="touch /tmp/pwned")
    assert code(sealed(msg)) == R.COMMAND_REFUSED


@pytest.mark.parametrize(
    "mtype",
    [
        MessageType.NAT_ACCESS,
        MessageType.CLIENT_TIMEOUT_NAT_ACCESS,
        MessageType.LOCAL_NAT_ACCESS,
        MessageType.CLIENT_TIMEOUT_LOCAL_NAT_ACCESS,
    ],
)
def test_nat_messages_are_refused(mtype: MessageType) -> None:
    msg = message(
        message_type=mtype,
        nat_access=("192.0.2.5", 22),
        client_timeout=30 if mtype.has_timeout else None,
    )
    result = verifier().verify(SRC, DST, sealed(msg), NOW)
    assert result.code == R.NAT_REFUSED
    assert result.message is not None and result.message.nat_access == ("192.0.2.5", 22)


def test_an_allow_ip_equal_to_the_source_opens_the_source() -> None:
    result = verifier().verify(SRC, DST, packet(allow_ip="198.51.100.10"), NOW)
    assert result.ok and result.open_address == SRC


def test_another_allow_ip_needs_spa_allow_ip_any() -> None:
    p = packet(allow_ip="203.0.113.7")
    assert code(p) == R.ALLOW_IP_REFUSED
    result = verifier(spa_user(allow_any_ip=True)).verify(SRC, DST, p, NOW)
    assert result.ok and result.open_address == ip("203.0.113.7")


@pytest.mark.parametrize("allow", ["224.0.0.1", "255.255.255.255", "127.0.0.1", "240.0.0.1"])
def test_an_any_user_cannot_name_a_non_unicast_address(allow: str) -> None:
    assert code(packet(allow_ip=allow), spa_user(allow_any_ip=True)) == R.ALLOW_IP_REFUSED


def test_an_ipv6_source_opens_itself_with_the_unspecified_allow_ip() -> None:
    result = verifier().verify(SRC6, DST, packet(), NOW)
    assert result.ok and result.open_address == SRC6
    assert code(packet(allow_ip="198.51.100.10"), src=SRC6) == R.ALLOW_IP_REFUSED


def test_inspect_without_a_source_cannot_say_which_address_opens() -> None:
    result = verifier().verify(None, DST, packet(), NOW)
    assert result.ok and result.open_address == b""
    named = verifier().verify(None, DST, packet(allow_ip="203.0.113.7"), NOW)
    assert named.ok and named.open_address == ip("203.0.113.7")


@pytest.mark.parametrize(
    "access",
    [(("tcp", 80),), (("udp", 22),), (("tcp", 22), ("tcp", 80)), (("icmp", 1),)],
)
def test_every_requested_port_must_be_allowed(access: tuple[tuple[str, int], ...]) -> None:
    assert code(packet(access=access)) == R.PORT_NOT_ALLOWED


def test_a_user_may_open_all_protected_ports_or_only_its_own() -> None:
    both = packet(access=(("tcp", 22), ("tcp", 2222)))
    result = verifier().verify(SRC, DST, both, NOW)
    assert result.ok and result.ports == frozenset({22, 2222})
    assert code(both, replace(spa_user(), ports=frozenset({22}))) == R.PORT_NOT_ALLOWED


def test_a_client_timeout_is_honoured_up_to_max_open_seconds() -> None:
    result = verifier().verify(SRC, DST, packet(client_timeout=60), NOW)
    assert result.ok and result.timeout == 60 and result.client_timeout == 60
    assert result.message_type == MessageType.CLIENT_TIMEOUT_ACCESS
    capped = verifier(max_open_seconds=90).verify(SRC, DST, packet(client_timeout=600), NOW)
    assert capped.ok and capped.timeout == 90
    zero = verifier().verify(SRC, DST, packet(client_timeout=0), NOW)
    assert zero.ok and zero.timeout is None


# --- several users ------------------------------------------------------------------


def test_the_first_user_to_pass_everything_wins() -> None:
    other = spa_user("aaron", key=OTHER_KEY, hmac_key=OTHER_KEY[::-1])
    result = verifier(other, spa_user("alice"), spa_user("zed")).verify(SRC, DST, packet(), NOW)
    assert result.ok and result.user == "alice"


def test_a_later_user_may_pass_where_an_earlier_one_refused() -> None:
    strict = spa_user("alice", username="root")
    result = verifier(strict, spa_user("bob")).verify(SRC, DST, packet(), NOW)
    assert result.ok and result.user == "bob"


def test_the_refusal_reported_is_the_furthest_a_user_got() -> None:
    wrong_hmac = spa_user("aaron", hmac_key=OTHER_KEY)
    wrong_key = spa_user("bob", key=OTHER_KEY)
    result = verifier(wrong_hmac, wrong_key).verify(SRC, DST, packet(), NOW)
    assert result.code == R.DECRYPT_FAILED and result.user == "bob"
    old = verifier(wrong_hmac, spa_user("carol")).verify(SRC, DST, packet(), NOW + 500)
    assert old.code == R.TOO_OLD and old.user == "carol" and old.timestamp == NOW


def test_users_without_hmac_are_tried_by_decryption() -> None:
    legacy = spa_user(hmac_key=None, mode="legacy")
    p = packet(client(hmac_key=None, mode="legacy"))
    assert code(p, legacy) == R.ACCEPTED
    assert code(p, spa_user(hmac_key=None)) == R.DECRYPT_FAILED


def test_without_hmac_a_non_canonical_ciphertext_is_refused() -> None:
    user = spa_user(hmac_key=None)
    p = packet(client(hmac_key=None))
    assert code(p, user) == R.ACCEPTED
    # Ciphertext of whole blocks: 16k+16 bytes is never a multiple of 3 here, so the
    # last character carries unused bits; flip one of them.
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    twin = alphabet[alphabet.index(p[-1:]) ^ 1]
    assert code(p[:-1] + bytes([twin]), user) == R.BAD_CIPHERTEXT


# --- properties ---------------------------------------------------------------------

_V = verifier(
    spa_user("alice"),
    spa_user("bob", hmac_key=None, key=OTHER_KEY),
    spa_user("carol", hmac_digest="sha512", key=OTHER_KEY, hmac_key=HMAC_KEY[::-1]),
)
_B64 = st.sampled_from(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1600), st.sampled_from([SRC, SRC6, b"", b"\x01", None]))
def test_any_bytes_are_refused_with_a_known_code(payload: bytes, src: bytes | None) -> None:
    result = _V.verify(src, DST, payload, NOW)
    assert not result.ok and result.code in R.CODES


@settings(max_examples=200, deadline=None)
@given(st.lists(_B64, min_size=140, max_size=1500))
def test_junk_of_valid_shape_is_refused(chars: list[int]) -> None:
    result = _V.verify(SRC, DST, bytes(chars), NOW)
    assert not result.ok and result.code in R.CODES


@settings(max_examples=150, deadline=None)
@given(
    digest=st.sampled_from(list(HMAC_DIGESTS)),
    hmac_digest=st.sampled_from(list(HMAC_DIGESTS)),
    mode=st.sampled_from([m for m in MODES if m != "legacy"]),
    ports=st.lists(st.sampled_from([22, 2222]), min_size=1, max_size=5),
    timeout=st.none() | st.integers(0, 65536),
    skew=st.integers(-120, 120),
    username=st.text(
        st.characters(
            min_codepoint=0x21, max_codepoint=0x7E, exclude_characters='"/\\[]:;|=,+*?<>'
        ),
        min_size=1,
        max_size=48,
    ),
)
def test_a_generated_valid_packet_always_verifies(
    digest: str,
    hmac_digest: str,
    mode: str,
    ports: list[int],
    timeout: int | None,
    skew: int,
    username: str,
) -> None:
    keys = client(hmac_digest=hmac_digest, mode=mode)
    p = packet(
        keys,
        digest=digest,
        access=[("tcp", port) for port in ports],
        client_timeout=timeout,
        username=username,
    )
    user = spa_user(hmac_digest=hmac_digest, mode=mode, username=username)
    result = verifier(user).verify(SRC, DST, p, NOW + skew)
    assert result.ok, result
    assert result.ports == frozenset(ports)
    assert result.timeout == (min(timeout, 300) if timeout else None)
    assert result.message is not None and result.message.username == username


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_any_single_character_change_is_refused(data: st.DataObject) -> None:
    p = packet()
    i = data.draw(st.integers(0, len(p) - 1))
    c = data.draw(_B64.filter(lambda ch: ch != p[i]))
    assert not verifier().verify(SRC, DST, p[:i] + bytes([c]) + p[i + 1 :], NOW).ok


@pytest.mark.parametrize("src", [b"", b"\x01\x02", bytes(5)])
def test_a_source_that_is_no_address_gets_no_candidate(src: bytes) -> None:
    assert code(packet(), src=src) == R.NO_USER_FOR_SOURCE
