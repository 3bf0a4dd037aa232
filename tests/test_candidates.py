"""The candidate store: prefixes exactly as the schemes derive them, and a table
whose start index always says what its slots hold."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from nfknock.candidates import NO_STEP, CandidateTable, PrefixDeriver
from nfknock.config import User
from nfknock.schemes import V1, Scheme, make_scheme
from nfknock.sequence import SchemeError, SequenceParams, derive

_params = st.builds(
    lambda lo, span, length, realm, exclude: SequenceParams(
        port_min=lo,
        port_max=min(65535, lo + span - 1),
        length=length,
        realm=realm,
        exclude=frozenset(exclude),
    ),
    lo=st.integers(1, 60000),
    span=st.sampled_from([64, 100, 1000, 4096, 32768, 30000]),
    length=st.integers(2, 40),
    realm=st.sampled_from([b"", b"gw1"]),
    exclude=st.lists(st.integers(1, 65535), max_size=8),
)


@settings(max_examples=200, deadline=None)
@given(
    params=_params,
    secret=st.binary(min_size=16, max_size=40),
    step=st.integers(0, 2**40),
    first=st.integers(0, 12),
    count=st.integers(1, 5),
    k=st.integers(1, 10),
)
def test_v1_prefixes_are_the_first_ports_of_the_derived_sequences(
    params: SequenceParams, secret: bytes, step: int, first: int, count: int, k: int
) -> None:
    try:
        V1(params)
        expected = [derive(secret, step, c, params)[:k] for c in range(first, first + count)]
    except SchemeError:
        return  # parameters the configuration refuses
    deriver = PrefixDeriver(V1(params), k)
    counters = range(first, first + count)
    assert deriver.prefixes(secret, step, counters) == expected
    assert deriver.prefixes(secret, step, counters, deriver.mac(secret)) == expected


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(["totp-knockd-rs", "livingstone", "kommen"]),
    secret=st.binary(min_size=16, max_size=32),
    step=st.integers(0, 2**32),
    k=st.integers(1, 8),
)
def test_other_schemes_prefixes_are_the_first_ports_of_their_sequences(
    name: str, secret: bytes, step: int, k: int
) -> None:
    scheme = make_scheme(name)
    counters = range(0, 3)
    expected = [tuple(scheme.derive(secret, step, c)[:k]) for c in counters]
    assert PrefixDeriver(scheme, k).prefixes(secret, step, counters) == expected


_ops = st.lists(
    st.tuples(
        st.sampled_from(["build", "drop"]),
        st.integers(0, 2),  # user
        st.integers(0, 6),  # step offset
        st.integers(0, 6),  # lowest counter
        st.integers(0, 4),  # how many counters
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(ops=_ops)
def test_the_table_holds_exactly_what_it_was_told_and_indexes_exactly_that(
    ops: list[tuple[str, int, int, int, int]],
) -> None:
    users = [User(f"u{i}", bytes([i + 1]) * 32) for i in range(3)]
    v1 = V1(SequenceParams(port_min=1024, port_max=1024 + 255, length=8))

    def scheme_of(user: User) -> Scheme:
        return v1

    table = CandidateTable(users, scheme_of, prefix_len=4, residues=4, ring=3)
    base = 1000
    wanted: dict[tuple[int, int], range] = {}  # (user, step) -> counters it must hold
    for op, u, t, lo, n in ops:
        step = base + t
        if op == "build":
            # a group holds one step of its residue at a time: building another
            # step of the same residue replaces it
            for key in [k for k in wanted if k[0] == u and k[1] % 4 == step % 4]:
                del wanted[key]
            table.build(u, step, range(lo, lo + n))
            wanted[(u, step)] = range(lo, lo + n)
        else:
            table.retire(step)
            for key in [k for k in wanted if k[1] == step]:
                del wanted[key]
    for (u, step), counters in wanted.items():
        for c in counters:
            s = table.slot_of(u, step, c)
            assert s >= 0
            assert table.holds(s, table.group_of(u, step), step, c)
            assert table.sequence(s) == derive(users[u].secret, step, c, v1.params)
            assert tuple(table.prefix[s * 4 : s * 4 + 4]) == table.sequence(s)[:4]
    # each step's index names exactly the slots held for that step
    k = table.k
    for step, idx in table.steps.items():
        held = {table.slot_of(u, step, c) for (u, t), cs in wanted.items() if t == step for c in cs}
        assert sorted(s for _, s in idx.anchors()) == sorted(held)
        partners: dict[int, list[int]] = {}
        for s in held:
            anchor, *followers = table.prefix[s * k : s * k + k]
            partners.setdefault(anchor, []).extend(followers)
            for f in followers:
                partners.setdefault(f, []).append(anchor)
        assert {p: sorted(v) for p, v in idx.partners.items() if v} == {
            p: sorted(v) for p, v in partners.items()
        }
    # no slot leaks: the wanted ones, and those of groups whose step's index was
    # dropped (freed when the group is built again)
    dropped = [g for g, t in enumerate(table.gstep) if t != NO_STEP and (g // 4, t) not in wanted]
    assert table.slots_in_use() == sum(len(cs) for cs in wanted.values()) + sum(
        len(table.held(g)) for g in dropped
    )


def test_a_one_port_sequence_is_held_but_never_indexed() -> None:
    v1 = V1(SequenceParams(port_min=1024, port_max=2047, length=1))
    table = CandidateTable([User("u", bytes(32))], lambda u: v1, prefix_len=6, residues=4, ring=3)
    table.build(0, 500, range(3))
    assert table.slot_of(0, 500, 2) >= 0
    assert not table.steps[500].anchors() and not any(table.steps[500].partners.values())
