"""nfknock.nfq: the verdict messages byte for byte, and VerdictQueue against a model of
the kernel's queue (net/netfilter/nfnetlink_queue.c) -- ids from one counter, a list
in id order, single verdicts by id, batch verdicts for every listed id up to N."""

from __future__ import annotations

import errno
import struct
import sys
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nfknock.events import Verdict
from nfknock.nfq import (
    NF_DROP,
    NF_REPEAT,
    NLM_F_ACK,
    NLM_F_REQUEST,
    Pumped,
    VerdictQueue,
    VerdictSendError,
    encode_verdict,
)

MARK = 0x4E4B0001
FD = 99
little_endian_only = pytest.mark.skipif(
    sys.byteorder != "little", reason="the expected bytes are written for a little-endian host"
)

# --- the messages -----------------------------------------------------------------------


@little_endian_only
def test_batch_drop_message_is_nlmsghdr_nfgenmsg_and_verdict_header_exactly() -> None:
    msg = encode_verdict(1, 0x01020304, NF_DROP, batch=True)
    assert msg == bytes.fromhex(
        "20000000"  # nlmsg_len 32 (host order)
        "0303"  # nlmsg_type: NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_VERDICT_BATCH
        "0100"  # nlmsg_flags: NLM_F_REQUEST, no ACK
        "00000000"  # nlmsg_seq
        "00000000"  # nlmsg_pid: 0, the kernel uses the socket's port id
        "00"  # nfgen_family AF_UNSPEC
        "00"  # version NFNETLINK_V0
        "0001"  # res_id: queue 1, big-endian
        "0c00"  # nla_len 12 (host order)
        "0200"  # nla_type NFQA_VERDICT_HDR
        "00000000"  # verdict NF_DROP, big-endian
        "01020304"  # id: the highest covered, big-endian
    )


@little_endian_only
def test_single_verdict_with_mark_appends_an_nfqa_mark_attribute() -> None:
    msg = encode_verdict(0x0102, 7, NF_REPEAT, mark=MARK, flags=NLM_F_REQUEST | NLM_F_ACK, seq=5)
    assert (
        msg
        == bytes.fromhex(
            "28000000"  # nlmsg_len 40
            "0103"  # NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_VERDICT
            "0500"  # NLM_F_REQUEST | NLM_F_ACK
            "05000000"  # seq 5
            "00000000"
            "00000102"  # AF_UNSPEC, V0, queue 0x0102 big-endian
            "0c000200" + "00000004" + "00000007"  # verdict header: NF_REPEAT, id 7
            "08000300" + "4e4b0001"  # NFQA_MARK, big-endian
        )
    )


def test_the_largest_queue_number_and_packet_id_are_encoded() -> None:
    msg = encode_verdict(0xFFFF, 0xFFFFFFFF, NF_DROP, batch=True)
    assert msg[18:20] == b"\xff\xff" and msg[-4:] == b"\xff\xff\xff\xff"


@pytest.mark.parametrize(("queue", "packet_id"), [(-1, 1), (65536, 1), (0, -1), (0, 1 << 32)])
def test_out_of_range_queue_or_id_is_refused(queue: int, packet_id: int) -> None:
    with pytest.raises(ValueError):
        encode_verdict(queue, packet_id, NF_DROP)


# --- a model of the kernel's side -----------------------------------------------------------


def _after(packet_id: int, max_id: int) -> bool:
    """nfq_id_after(): serial-number arithmetic on 32-bit ids."""
    diff = (packet_id - max_id) & 0xFFFFFFFF
    return 0 < diff < 0x80000000


class Kernel:
    """One queue instance: what nfnetlink_queue.c does with our messages."""

    def __init__(self, queue_num: int = 1, first_id: int = 1) -> None:
        self.queue_num = queue_num
        self.next_id = first_id
        self.listed: list[int] = []  # queue_list: in id order
        self.unread: deque[Packet] = deque()  # messages in our socket
        self.outcome: dict[int, tuple[str, int | None]] = {}
        self.errors: list[str] = []
        self.events: list[tuple[str, int]] = []  # ("verdict"|"batch"|"read", id)
        self.batches: list[int] = []  # how many packets each batch dropped

    def arrive(self, payload: bytes) -> int:
        pid = self.next_id
        self.next_id = (self.next_id + 1) & 0xFFFFFFFF
        self.listed.append(pid)
        self.unread.append(Packet(self, pid, payload))
        return pid

    def verdict(self, pid: int, name: str, mark: int | None) -> None:
        self.events.append(("verdict", pid))
        if pid not in self.listed:
            self.errors.append(f"ENOENT {pid}")
            return
        self.listed.remove(pid)
        self.outcome[pid] = (name, mark)

    def write(self, fd: int, data: bytes) -> int:
        """Parse a verdict message independently of the encoder and apply it."""
        assert fd == FD
        length, kind, flags, _seq, _pid = struct.unpack_from("=IHHII", data)
        family, version, res_id = struct.unpack_from(">BBH", data, 16)
        nla_len, nla_type = struct.unpack_from("=HH", data, 20)
        verdict, max_id = struct.unpack_from(">II", data, 24)
        assert (length, kind, flags) == (len(data), 0x0303, NLM_F_REQUEST)
        assert (family, version, res_id) == (0, 0, self.queue_num)
        assert (nla_len, nla_type, verdict) == (12, 2, NF_DROP)
        self.events.append(("batch", max_id))
        taken = []
        for pid in self.listed:
            if _after(pid, max_id):
                break
            taken.append(pid)
        if not taken:
            self.errors.append(f"ENOENT batch {max_id}")
        for pid in taken:
            self.listed.remove(pid)
            self.outcome[pid] = ("drop", None)
        self.batches.append(len(taken))
        return len(data)


class Packet:
    """The parts of netfilterqueue.Packet used, with its 'one verdict' check."""

    def __init__(self, kernel: Kernel, pid: int, payload: bytes) -> None:
        self.kernel = kernel
        self.id = pid
        self.payload = payload
        self.mark: int | None = None
        self.done = False

    def get_payload(self) -> bytes:
        return self.payload

    def set_mark(self, mark: int) -> None:
        self.mark = mark

    def _verdict(self, name: str) -> None:
        if self.done:
            raise RuntimeError("Verdict already given for this packet")
        self.done = True
        self.kernel.verdict(self.id, name, self.mark)

    def accept(self) -> None:
        self._verdict("accept")

    def drop(self) -> None:
        self._verdict("drop")

    def repeat(self) -> None:
        self._verdict("repeat")


class Queue:
    """netfilterqueue.NetfilterQueue's run(block=False): read until the socket is
    empty, one callback per message; a callback's exception leaves run() after it."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.callback: Callable[[Any], None] | None = None
        self.unbound = False

    def get_fd(self) -> int:
        return FD

    def run(self, block: bool = True) -> None:
        assert not block
        assert self.callback is not None
        while self.kernel.unread:
            pkt = self.kernel.unread.popleft()
            self.kernel.events.append(("read", pkt.id))
            self.callback(pkt)

    def unbind(self) -> None:
        self.unbound = True
        for pid in self.kernel.listed:  # instance destroyed: nfqnl_flush(NF_DROP)
            self.kernel.outcome[pid] = ("unbind", None)
        self.kernel.listed.clear()


class Boom(Exception):
    pass


def decide(payload: bytes) -> Verdict:
    """The payload says what to do: A(ccept), R(eject), D(rop), X (raise), K (^C)."""
    kind = payload[:1]
    if kind == b"X":
        raise Boom("decide failed")
    if kind == b"K":
        raise KeyboardInterrupt
    return {b"A": Verdict.ACCEPT, b"R": Verdict.REJECT}.get(kind, Verdict.DROP)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(
    batch: int = 64,
    kernel: Kernel | None = None,
    send: Callable[[int, bytes], int] | None = None,
    clock: Callable[[], float] | None = None,
    decide_fn: Callable[[bytes], Verdict] = decide,
    errors: list[Exception] | None = None,
) -> tuple[VerdictQueue, Kernel, Queue]:
    kernel = kernel or Kernel()
    queue = Queue(kernel)
    vq = VerdictQueue(
        queue,
        kernel.queue_num,
        decide_fn,
        batch=batch,
        reject_mark=MARK,
        on_error=None if errors is None else errors.append,
        send=send or kernel.write,
        clock=clock or Clock(),
    )
    queue.callback = vq._on_packet
    return vq, kernel, queue


def feed(kernel: Kernel, kinds: Iterable[str]) -> list[int]:
    return [kernel.arrive(k.encode()) for k in kinds]


FOREVER = float("inf")

# --- VerdictQueue ---------------------------------------------------------------------------


def test_drops_are_sent_as_full_batches_then_the_rest_when_the_socket_is_empty() -> None:
    vq, kernel, _ = make(batch=64)
    ids = feed(kernel, "D" * 200)
    assert vq.pump(1000, FOREVER) == Pumped(200, True)
    assert kernel.batches == [64, 64, 64, 8]
    assert [e for e in kernel.events if e[0] == "batch"] == [
        ("batch", ids[63]),
        ("batch", ids[127]),
        ("batch", ids[191]),
        ("batch", ids[199]),
    ]
    assert kernel.listed == [] and kernel.errors == []
    assert vq.pending == 0 and vq.batches_sent == 4


def test_accept_and_reject_are_given_before_the_next_packet_is_read() -> None:
    vq, kernel, _ = make(batch=64)
    d1, a, r, d2 = feed(kernel, "DARD")
    vq.pump(10, FOREVER)
    assert kernel.events == [
        ("read", d1),
        ("read", a),
        ("verdict", a),
        ("read", r),
        ("verdict", r),
        ("read", d2),
        ("batch", d2),
    ]
    assert kernel.outcome[a] == ("accept", None)
    assert kernel.outcome[r] == ("repeat", MARK)  # REJECT: mark + repeat
    assert kernel.outcome[d1] == kernel.outcome[d2] == ("drop", None)
    assert kernel.errors == []


def test_a_decide_function_that_raises_means_drop_and_is_reported() -> None:
    errors: list[Exception] = []
    vq, kernel, _ = make(batch=4, errors=errors)
    ids = feed(kernel, "XAXD")
    assert vq.pump(10, FOREVER).handled == 4
    assert kernel.outcome[ids[0]] == kernel.outcome[ids[2]] == ("drop", None)
    assert kernel.outcome[ids[1]] == ("accept", None)
    assert [type(e) for e in errors] == [Boom, Boom]


def test_an_error_sink_that_raises_does_not_cost_a_verdict() -> None:
    def bad_sink(exc: Exception) -> None:
        raise RuntimeError("logging is broken")

    kernel = Kernel()
    queue = Queue(kernel)
    vq = VerdictQueue(
        queue, 1, decide, batch=8, reject_mark=MARK, on_error=bad_sink, send=kernel.write
    )
    queue.callback = vq._on_packet
    ids = feed(kernel, "XXA")
    assert vq.pump(10, FOREVER) == Pumped(3, True)
    assert [kernel.outcome[i][0] for i in ids] == ["drop", "drop", "accept"]


def test_a_base_exception_in_decide_still_drops_the_packet_then_propagates() -> None:
    vq, kernel, _ = make(batch=64)
    ids = feed(kernel, "DKD")
    with pytest.raises(KeyboardInterrupt):
        vq.pump(10, FOREVER)
    # the packet it was raised for and the one before it: dropped by the flush on the
    # way out; the third is still unread, not lost
    assert kernel.outcome == {ids[0]: ("drop", None), ids[1]: ("drop", None)}
    assert kernel.listed == [ids[2]] and vq.pending == 0
    vq.pump(10, FOREVER)
    assert kernel.outcome[ids[2]] == ("drop", None)


@pytest.mark.parametrize("bogus", [None, 1, "ACCEPT", Verdict.DROP])
def test_anything_but_accept_or_reject_is_a_drop(bogus: object) -> None:
    vq, kernel, _ = make(batch=2, decide_fn=lambda _p: bogus)  # type: ignore[arg-type,return-value]
    ids = feed(kernel, "AA")
    vq.pump(10, FOREVER)
    assert [kernel.outcome[i][0] for i in ids] == ["drop", "drop"]


def test_max_packets_stops_the_pump_and_flushes_what_it_read() -> None:
    vq, kernel, _ = make(batch=64)
    ids = feed(kernel, "D" * 100)
    assert vq.pump(10, FOREVER) == Pumped(10, False)
    assert sorted(kernel.outcome) == ids[:10]
    assert kernel.listed == ids[10:] and len(kernel.unread) == 90
    assert vq.pump(0, FOREVER) == Pumped(0, False)  # reads nothing
    assert len(kernel.unread) == 90


def test_the_first_packet_past_the_deadline_is_the_last_one_read() -> None:
    clock = Clock()

    def slow(payload: bytes) -> Verdict:
        clock.now += 0.001  # each decision takes 1 ms
        return Verdict.DROP

    vq, kernel, _ = make(batch=64, clock=clock, decide_fn=slow)
    feed(kernel, "D" * 100)
    got = vq.pump(1000, deadline=0.0105)
    assert got == Pumped(11, False)  # the 11th decision ends at 11 ms > 10.5 ms
    assert len(kernel.outcome) == 11 and vq.pending == 0


def test_an_expired_deadline_still_reads_one_packet() -> None:
    clock = Clock()
    clock.now = 5.0
    vq, kernel, _ = make(clock=clock)
    feed(kernel, "DD")
    assert vq.pump(10, deadline=1.0) == Pumped(1, False)


def test_batch_one_drops_each_packet_at_once_without_batch_messages() -> None:
    sent: list[bytes] = []

    def record(fd: int, data: bytes) -> int:
        sent.append(data)
        return len(data)

    vq, kernel, _ = make(batch=1, send=record)
    ids = feed(kernel, "DDAD")
    vq.pump(10, FOREVER)
    assert sent == []
    assert [kernel.outcome[i][0] for i in ids] == ["drop", "drop", "accept", "drop"]
    assert [e for e in kernel.events if e[0] == "verdict"] == [("verdict", i) for i in ids]


def test_a_failed_send_is_retried_once() -> None:
    kernel = Kernel()
    calls: list[int] = []

    def flaky(fd: int, data: bytes) -> int:
        calls.append(1)
        if len(calls) == 1:
            raise OSError(errno.ENOBUFS, "No buffer space available")
        return kernel.write(fd, data)

    vq, _, _ = make(batch=64, kernel=kernel, send=flaky)
    feed(kernel, "DDD")
    assert vq.pump(10, FOREVER) == Pumped(3, True)
    assert len(calls) == 2 and kernel.listed == [] and vq.send_failures == 1


def test_a_batch_that_cannot_be_sent_stays_pending_and_the_next_batch_covers_it() -> None:
    kernel = Kernel()
    broken = True

    def send(fd: int, data: bytes) -> int:
        if broken:
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        return kernel.write(fd, data)

    vq, _, _ = make(batch=64, kernel=kernel, send=send)
    first = feed(kernel, "DDAD")
    with pytest.raises(VerdictSendError) as info:
        vq.pump(10, FOREVER)
    assert info.value.errno == errno.ENOMEM
    assert "3 packets" in str(info.value)
    # fail closed: the DROPs are still queued (not accepted), still pending
    assert kernel.listed == [first[0], first[1], first[3]] and vq.pending == 3
    assert kernel.outcome == {first[2]: ("accept", None)}
    broken = False
    later = feed(kernel, "D")
    vq.pump(10, FOREVER)
    assert kernel.listed == [] and kernel.batches == [4]
    assert {kernel.outcome[i][0] for i in [*first[:2], first[3], *later]} == {"drop"}


def test_a_short_write_counts_as_a_failure() -> None:
    vq, kernel, _ = make(batch=64, send=lambda fd, data: len(data) - 1)
    feed(kernel, "D")
    with pytest.raises(VerdictSendError, match="short write"):
        vq.pump(10, FOREVER)


def test_close_sends_what_is_pending_then_unbinds_once() -> None:
    kernel = Kernel()
    broken = True

    def send(fd: int, data: bytes) -> int:
        if broken:
            raise OSError(errno.ENOBUFS, "No buffer space available")
        return kernel.write(fd, data)

    vq, _, queue = make(batch=64, kernel=kernel, send=send)
    ids = feed(kernel, "DD")
    with pytest.raises(VerdictSendError):
        vq.pump(10, FOREVER)
    assert vq.pending == 2
    broken = False
    vq.close()
    vq.close()
    assert queue.unbound and kernel.batches == [2]
    assert kernel.outcome == {ids[0]: ("drop", None), ids[1]: ("drop", None)}


def test_close_unbinds_even_when_the_last_batch_cannot_be_sent() -> None:
    def broken(fd: int, data: bytes) -> int:
        raise OSError(errno.EBADF, "Bad file descriptor")

    vq, kernel, queue = make(batch=64, send=broken)
    ids = feed(kernel, "DD")
    with pytest.raises(VerdictSendError):
        vq.pump(10, FOREVER)
    vq.close()
    assert queue.unbound  # the kernel drops what is queued: fail closed
    assert kernel.outcome == {ids[0]: ("unbind", None), ids[1]: ("unbind", None)}


def test_batches_cover_ids_across_the_32_bit_wrap() -> None:
    vq, kernel, _ = make(batch=64, kernel=Kernel(first_id=0xFFFFFFFE))
    ids = feed(kernel, "DDDD")
    assert ids == [0xFFFFFFFE, 0xFFFFFFFF, 0, 1]
    vq.pump(10, FOREVER)
    assert kernel.events[-1] == ("batch", 1) and kernel.batches == [4]
    assert kernel.listed == [] and kernel.errors == []


def test_batch_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="batch"):
        make(batch=0)


# --- the property: exactly one verdict per packet, the right one, never delayed ------------


kinds = st.lists(st.sampled_from("AARDDDDDDX"), min_size=1, max_size=300)


@settings(max_examples=300, deadline=None)
@given(
    kinds,
    st.integers(1, 70),
    st.lists(st.integers(1, 50), min_size=1, max_size=20),
    st.integers(1, 0xFFFFFFFF),
)
def test_every_packet_gets_exactly_one_verdict_of_its_kind(
    packets: list[str], batch: int, slices: list[int], first_id: int
) -> None:
    kernel = Kernel(first_id=first_id)
    vq, _, _ = make(batch=batch, kernel=kernel, errors=[])
    ids = feed(kernel, packets)
    turn = 0
    while kernel.unread:
        limit = slices[turn % len(slices)]
        got = vq.pump(limit, FOREVER)
        turn += 1
        assert vq.pending == 0  # nothing is left pending when pump returns
        # drained: the socket said so; a pump the limit ended cannot know
        assert got.drained == (got.handled < limit)
        assert not (got.drained and kernel.unread)
        # everything read has had its verdict: only unread packets are still listed
        assert kernel.listed == [p.id for p in kernel.unread]
    expected = {"A": "accept", "R": "repeat"}
    for pid, kind in zip(ids, packets, strict=True):
        assert kernel.outcome[pid][0] == expected.get(kind, "drop")
    assert kernel.errors == []  # no verdict for an unknown id, no empty batch
    # an ACCEPT/REJECT is given before the next packet is read
    for pid, kind in zip(ids, packets, strict=True):
        if kind in "AR":
            at = kernel.events.index(("read", pid))
            assert kernel.events[at + 1] == ("verdict", pid)
    assert all(n <= batch for n in kernel.batches)
