"""The NFQUEUE edge: one bound queue, read in bounded slices, DROPs answered in batches.

Besides ``daemon.py`` the only module that touches netfilterqueue.  A
:class:`VerdictQueue` owns one bound queue and one decide function (payload ->
:class:`Verdict`).  ``pump(max_packets, deadline)`` reads what the socket holds and
returns when it is empty, when ``max_packets`` were read, or when ``deadline``
(``time.monotonic``) has passed -- whichever comes first.  Two of them serve two
queues in one process; the caller polls both fds and pumps the priority queue first.

Two queues in one process (the daemon's loop)::

    prio = VerdictQueue.bind(cfg.queue.number, decide, batch=1, ...)
    knock = VerdictQueue.bind(cfg.queue.knock_number, decide, batch=cfg.queue.batch, ...)
    while not stopping:
        poll(prio.fd, knock.fd, signal wake-up fd; timeout: 0 if busy else T)
        now = time.monotonic()
        p = prio.pump(BIG, now + SLICE)      # first, on every turn
        k = knock.pump(KNOCK_SLICE, now + SLICE)
        busy = not (p.drained and k.drained)
        housekeeping (signals, ticks) -- nothing is pending in either queue here

The priority queue is read to its end on every turn, bounded only by the deadline
(so a flood on it cannot starve the knock queue completely, nor the loop); the
knock queue gets a slice of ``KNOCK_SLICE`` packets, after which the priority queue
is looked at again.  With every pump bounded by a deadline the loop sees a stop
signal within one turn, flood or not (netfilterqueue's ``run(block=False)`` alone
returns only when the socket is empty).

Theory of operation
-------------------
Receiving stays netfilterqueue's (``run(block=False)``: a C ``recv`` loop calling
back into Python per packet).  ACCEPT and REJECT (``set_mark`` + ``repeat``: the
hook runs again and the static reject-mark rule answers) are given at once, one
verdict message each, through netfilterqueue.  A DROP on a batched queue only
records the packet's id; one ``NFQNL_MSG_VERDICT_BATCH`` message then drops every
packet of the queue whose id is <= the last recorded one.

Why "every id up to N" is exactly the pending DROPs (net/netfilter/
nfnetlink_queue.c: ``__nfqnl_enqueue_packet``, ``nfqnl_recv_verdict_batch``):

1. The kernel numbers a queue's packets from one counter (``++id_sequence``), under
   the queue's lock, and in the same critical section sends the packet's message
   to our socket and appends it to the queue's list.  So list order == id order ==
   the order in which we read them.  A packet whose message did not fit in our
   socket (``user_dropped``) is never listed: the kernel dropped it.
2. A batch verdict walks that list from its head and takes every entry until the
   first whose id is after N (serial arithmetic, ``(int)(id - N) > 0``: correct
   across the 2^32 wrap while fewer than 2^31 packets are queued; ``max_len`` is far
   below that).
3. When we flush, N is the id of the last packet we read and decided DROP.  Every
   packet read before it has either been answered individually (ACCEPT, REJECT --
   those are gone from the list) or is itself a pending DROP; packets not yet read
   have larger ids.  Hence the batch covers the pending DROPs and nothing else --
   **provided no packet with an id <= N is held back for a later verdict.**  A
   batched queue must therefore never retain a packet (this class offers no way to);
   the priority queue, which may one day hold a SYN until its grant is confirmed,
   is unbatched (``batch=1``: each DROP is ``pkt.drop()`` at once).  Also required:
   this socket is the queue's only verdict-giver (the kernel enforces it: verdicts
   from another netlink port are refused with EPERM), and the bookkeeping starts
   afresh with every bind (a new queue instance restarts its ids at 1).

When a batch is flushed: when ``batch`` DROPs are pending; when the socket is empty;
before ``pump`` returns for any reason (limit, deadline, exception) -- so nothing is
pending while the caller waits in ``poll`` or does housekeeping; and in
:meth:`VerdictQueue.close`.

Failure of a batch (no ACK is asked for).  ``os.write`` on the netlink socket runs
the kernel's handler synchronously; a failed send (ENOBUFS, ENOMEM) is seen at once,
is retried once, and then raises :class:`VerdictSendError` out of ``pump`` with the
DROPs still pending, so the next flush retries them.  Retrying is always safe: a
batch is idempotent (an id already answered is no longer listed).  An error *inside*
the kernel's handler comes back as an NLMSG_ERROR message on the same socket --
with or without NLM_F_ACK -- and netfilterqueue's ``run()`` hands it to libnfnetlink,
which discards everything that is not a queue message; seeing it would mean
replacing the C receive loop with a Python one (per-packet cost), and an ACK would
only add a message per batch to the receive buffer.  What such an error could say:
ENOENT (nothing left to drop: harmless), EPERM/ENODEV (the queue is no longer ours:
no verdict of ours works any more).  Either way the failure is closed: a packet
whose DROP is lost stays queued -- never accepted --, holds one of the ``max_len``
slots, and is dropped by the next batch (which covers every id up to its own) or
by the kernel when the queue is unbound (no ``--queue-bypass``).

Every packet gets exactly one verdict: it is given (or recorded) in a ``finally``
before anything else that can raise; a decide function that raises means DROP.
``pump`` leaves ``run()`` by raising a private exception from the callback after
that packet's verdict is recorded (netfilterqueue propagates a callback's exception
out of ``run()``, after that packet).  A signal handler that raises (the default
SIGINT) may interrupt the ``finally`` itself: the packet then stays queued until the
kernel drops it at unbind -- install handlers that only set a flag.
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple, Protocol

from nfknock.events import Verdict

if TYPE_CHECKING:
    from netfilterqueue import Packet

# linux/netfilter.h verdicts
NF_DROP = 0
NF_ACCEPT = 1
NF_REPEAT = 4
# linux/netfilter/nfnetlink.h, linux/netfilter/nfnetlink_queue.h
NFNL_SUBSYS_QUEUE = 3
NFNETLINK_V0 = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_VERDICT_BATCH = 3
NFQA_VERDICT_HDR = 2
NFQA_MARK = 3
# linux/netlink.h
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
AF_UNSPEC = 0

# nlmsghdr (len, type, flags, seq, pid) is in host byte order; nfgenmsg is (family,
# version, res_id big-endian); an attribute header (len, type) is in host byte order,
# its payload -- nfqnl_msg_verdict_hdr {verdict, id}, or a mark -- big-endian.
_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct(">BBH")
_NLATTR = struct.Struct("=HH")
_BE32 = struct.Struct(">I")
_VERDICT_ATTR_LEN = _NLATTR.size + 8
_MARK_ATTR_LEN = _NLATTR.size + 4


def encode_verdict(
    queue_num: int,
    packet_id: int,
    verdict: int,
    *,
    batch: bool = False,
    mark: int | None = None,
    flags: int = NLM_F_REQUEST,
    seq: int = 0,
) -> bytes:
    """One netlink message: a verdict for ``packet_id`` on ``queue_num`` or, with
    ``batch``, for every queued packet whose id is <= ``packet_id``.  ``mark`` sets
    the packets' netfilter mark (NFQA_MARK)."""
    if not 0 <= queue_num <= 0xFFFF:
        raise ValueError(f"queue number {queue_num} is not in 0..65535")
    if not 0 <= packet_id <= 0xFFFFFFFF:
        raise ValueError(f"packet id {packet_id} is not a 32-bit value")
    kind = NFQNL_MSG_VERDICT_BATCH if batch else NFQNL_MSG_VERDICT
    body = _NFGENMSG.pack(AF_UNSPEC, NFNETLINK_V0, queue_num)
    body += _NLATTR.pack(_VERDICT_ATTR_LEN, NFQA_VERDICT_HDR)
    body += _BE32.pack(verdict) + _BE32.pack(packet_id)
    if mark is not None:
        body += _NLATTR.pack(_MARK_ATTR_LEN, NFQA_MARK) + _BE32.pack(mark)
    length = _NLMSGHDR.size + len(body)  # every part is a multiple of 4: no padding
    return _NLMSGHDR.pack(length, NFNL_SUBSYS_QUEUE << 8 | kind, flags, seq, 0) + body


class VerdictSendError(OSError):
    """A batch DROP could not be sent.  Its packets stay queued (dropped, never
    accepted) and are covered by the next batch, which retries them."""


class Pumped(NamedTuple):
    handled: int  # packets read and answered (or pending in a batch that was then sent)
    drained: bool  # the socket was empty: safe to wait in poll()


class QueueHandle(Protocol):
    """What :class:`VerdictQueue` uses of ``netfilterqueue.NetfilterQueue``."""

    def get_fd(self) -> int: ...
    def run(self, block: bool = ...) -> None: ...
    def unbind(self) -> None: ...


Decide = Callable[[bytes], Verdict]
ErrorSink = Callable[[Exception], None]


_DROP, _ACCEPT, _REJECT = Verdict.DROP, Verdict.ACCEPT, Verdict.REJECT


class _Yield(Exception):
    """Raised from the callback (after the packet's verdict) to leave ``run()``."""


class VerdictQueue:
    """One bound NFQUEUE: reads packets in bounded slices and answers each once.

    ``batch`` > 1: DROPs are sent as batch verdicts of up to that many packets.
    ``batch`` == 1: every verdict is given at once (the priority queue)."""

    def __init__(
        self,
        queue: QueueHandle,
        queue_num: int,
        decide: Decide,
        *,
        batch: int,
        reject_mark: int,
        on_error: ErrorSink | None = None,
        send: Callable[[int, bytes], int] = os.write,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if batch < 1:
            raise ValueError(f"batch must be at least 1, not {batch}")
        self.queue_num = queue_num
        self.batch = batch
        self._queue = queue
        self._fd = queue.get_fd()
        self._decide = decide
        self._mark = reject_mark
        self._on_error = on_error
        self._send = send
        self._clock = clock
        self._prefix = encode_verdict(queue_num, 0, NF_DROP, batch=True)[:-4]
        self._pending = 0  # DROPs recorded since the last batch was sent
        self._last_drop = 0  # the id of the last of them
        self._batched = batch > 1
        self._left = 0  # packets this pump may still read
        self._deadline = 0.0
        self._closed = False
        self.batches_sent = 0
        self.send_failures = 0

    @classmethod
    def bind(
        cls,
        queue_num: int,
        decide: Decide,
        *,
        max_len: int,
        copy_range: int,
        sock_len: int,
        batch: int,
        reject_mark: int,
        on_error: ErrorSink | None = None,
    ) -> VerdictQueue:
        """Bind ``queue_num`` (OSError when it is taken or CAP_NET_ADMIN is missing)."""
        from netfilterqueue import NetfilterQueue

        nfq = NetfilterQueue()
        reader = cls(
            nfq, queue_num, decide, batch=batch, reject_mark=reject_mark, on_error=on_error
        )
        nfq.bind(queue_num, reader._on_packet, max_len=max_len, range=copy_range, sock_len=sock_len)
        return reader

    @property
    def fd(self) -> int:
        """The netlink socket to poll for POLLIN."""
        return self._fd

    @property
    def pending(self) -> int:
        """DROPs recorded but not yet sent (0 whenever ``pump`` has returned normally)."""
        return self._pending

    def pump(self, max_packets: int, deadline: float) -> Pumped:
        """Read and answer packets until the socket is empty, ``max_packets`` were
        read, or ``deadline`` (monotonic) has passed; at least one packet is read if
        one is waiting and ``max_packets`` > 0.  Nothing is left pending on return.
        Raises :class:`VerdictSendError` when a batch could not be sent, and whatever
        ``run()`` raises (a failed ``recv``); the batch is flushed first."""
        if max_packets <= 0:
            return Pumped(0, False)
        self._left = max_packets
        self._deadline = deadline
        drained = False
        try:
            self._queue.run(block=False)
            drained = True
        except _Yield:
            pass
        finally:
            self.flush()
        return Pumped(max_packets - self._left, drained)

    def flush(self) -> None:
        """Send the pending DROPs as one batch verdict (retried once)."""
        if not self._pending:
            return
        message = self._prefix + _BE32.pack(self._last_drop)
        for attempt in (1, 2):
            try:
                sent = self._send(self._fd, message)
                if sent != len(message):
                    raise OSError(f"short write to the netlink socket: {sent} bytes")
            except OSError as exc:
                self.send_failures += 1
                if attempt == 2:
                    what = (
                        f"batch DROP of {self._pending} packets up to id {self._last_drop} "
                        f"on queue {self.queue_num} not sent: {exc.strerror or exc}"
                    )
                    if exc.errno is None:
                        raise VerdictSendError(what) from exc
                    raise VerdictSendError(exc.errno, what) from exc
                continue
            self._pending = 0
            self.batches_sent += 1
            return

    def close(self) -> None:
        """Send what is pending, then unbind (the kernel drops anything still queued)."""
        if self._closed:
            return
        self._closed = True
        try:
            with contextlib.suppress(OSError):
                self.flush()
        finally:
            self._queue.unbind()

    def __enter__(self) -> VerdictQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the packet path: netfilterqueue's callback ------------------------------------

    def _on_packet(self, pkt: Packet) -> None:
        # The hot path (every packet): local names and no call that is not needed.
        verdict = _DROP
        try:
            verdict = self._decide(pkt.get_payload())
        except Exception as exc:  # a bug or an unreadable packet: DROP, and say so
            verdict = _DROP
            self._report(exc)
        finally:
            if verdict is _ACCEPT or verdict is _REJECT:
                self._answer_now(pkt, verdict)
            elif self._batched:  # DROP, or anything that is not a Verdict: fail closed
                self._last_drop = pkt.id
                self._pending = pending = self._pending + 1
                if pending >= self.batch:
                    self.flush()
            else:
                pkt.drop()
        self._left -= 1
        if self._left <= 0 or self._clock() >= self._deadline:
            raise _Yield

    def _answer_now(self, pkt: Packet, verdict: Verdict) -> None:
        try:
            if verdict is _ACCEPT:
                pkt.accept()
            else:
                pkt.set_mark(self._mark)
                pkt.repeat()  # re-runs the hook; the reject-mark rule answers
        except Exception:  # e.g. the queue was unbound: the last resort is DROP
            with contextlib.suppress(Exception):
                pkt.drop()

    def _report(self, exc: Exception) -> None:
        if self._on_error is not None:
            with contextlib.suppress(Exception):  # a broken sink must not cost a verdict
                self._on_error(exc)
