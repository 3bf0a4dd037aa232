"""The v1 extensions (sequence.py steps 7 and 8): the door that follows a sequence in
its bit stream, and the ISN each knock carries.  Pinned by vectors, and re-derived
here by a deliberately naive reference (the stream as a string of '0'/'1')."""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nfknock.sequence import (
    DOOR_DERIVATION,
    ISN_DERIVATION,
    SchemeError,
    SequenceParams,
    derive,
    door_from_block,
    door_port,
    first_block,
    isns,
    isns_from_block,
    parse_base32,
    step_of,
)
from tests.helpers import vector_params

VECTORS = json.loads((Path(__file__).parent / "vectors" / "sequence-v1-ext.json").read_text())
CASES = VECTORS["cases"]


def _reference(
    secret: bytes, block: bytes, p: SequenceParams, dlo: int, dhi: int
) -> tuple[list[int], int]:
    """Steps 5-7 spelled out: the stream as text, read word by word."""
    bits = ""
    index = 0

    def more() -> None:
        nonlocal bits, index
        extension = block + struct.pack(">I", index)
        data = block if index == 0 else hmac.digest(secret, extension, "sha512")
        bits += "".join(f"{b:08b}" for b in data)
        index += 1

    pos = 0

    def word(width: int) -> int:
        nonlocal pos
        while len(bits) - pos < width:
            more()
        w = int(bits[pos : pos + width], 2)
        pos += width
        return w

    ports: list[int] = []
    while len(ports) < p.length:
        w = word(p.width)
        port = p.port_min + w
        if w < p.span and port not in p.exclude and port not in ports:
            ports.append(port)
    dspan = dhi - dlo + 1
    dwidth = (dspan - 1).bit_length()
    while True:
        w = word(dwidth) if dwidth else 0
        if w < dspan:
            return ports, dlo + w


def test_the_vectors_name_the_derivation_versions() -> None:
    assert VECTORS["extensions"] == {"door": DOOR_DERIVATION, "isn": ISN_DERIVATION}


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_door_vectors_match(case: dict[str, Any]) -> None:
    secret = parse_base32(case["secret_base32"])
    step = step_of(case["unix_time"], case["step_seconds"])
    p = vector_params(case)
    block = first_block(secret, step, case["counter"], p.realm)
    assert list(derive(secret, step, case["counter"], p)) == case["ports"]
    for d in case["doors"]:
        lo, hi = d["door_min"], d["door_max"]
        assert door_from_block(secret, block, p, lo, hi) == d["door"]
        assert door_port(secret, step, case["counter"], p, lo, hi) == d["door"]
        ports, door = _reference(secret, block, p, lo, hi)
        assert (ports, door) == (case["ports"], d["door"])


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_isn_vectors_match(case: dict[str, Any]) -> None:
    secret = parse_base32(case["secret_base32"])
    step = step_of(case["unix_time"], case["step_seconds"])
    p = vector_params(case)
    block = first_block(secret, step, case["counter"], p.realm)
    assert list(isns_from_block(secret, block, p.length)) == case["isns"]
    assert list(isns(secret, step, case["counter"], p)) == case["isns"]
    # The reference: 16 ISNs per block of HMAC(K, H_c || "isn" || BE32(j)).
    for i, isn in enumerate(case["isns"]):
        j, k = divmod(i, 16)
        data = hmac.digest(secret, block + b"isn" + struct.pack(">I", j), hashlib.sha512)
        assert isn == int.from_bytes(data[4 * k : 4 * k + 4], "big")


@given(
    secret=st.binary(min_size=16, max_size=40),
    step=st.integers(0, 1 << 40),
    counter=st.integers(0, 5),
    lo=st.integers(1, 65535),
    size=st.integers(0, 70000),
    length=st.integers(1, 40),
)
def test_door_is_the_next_accepted_word_of_the_stream(
    secret: bytes, step: int, counter: int, lo: int, size: int, length: int
) -> None:
    hi = min(65535, lo + size)
    p = SequenceParams(port_min=1024, port_max=33791, length=length)
    block = first_block(secret, step, counter)
    door = door_from_block(secret, block, p, lo, hi)
    assert lo <= door <= hi
    assert _reference(secret, block, p, lo, hi)[1] == door


def test_isns_do_not_change_the_sequence_or_depend_on_the_door() -> None:
    secret = b"k" * 32
    block = first_block(secret, 1000, 0)
    assert len(set(isns_from_block(secret, block, 40))) == 40
    assert isns_from_block(secret, block, 40)[:8] == isns_from_block(secret, block, 8)


def test_an_impossible_door_range_is_refused() -> None:
    p = SequenceParams(length=8)
    with pytest.raises(SchemeError):
        door_from_block(b"k" * 32, first_block(b"k" * 32, 1, 0), p, 40000, 39999)
