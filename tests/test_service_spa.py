"""SPA packets through the daemon's logic without a kernel: every form the rules
queue (UDP and TCP SYN with payload, IPv4 and IPv6) reaches the verifier, is
dropped, and a good one opens the protected port for its source."""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from nfknock.config import load_config
from nfknock.events import Verdict
from nfknock.logs import EventLogger
from nfknock.netlab.craft import tcp_syn, v4, v6
from nfknock.service import Service
from nfknock.spa.encode import ClientKeys, encode_access
from nfknock_client.knock import syn_segment

from .spa_support import HMAC_KEY, KEY

WALL = 1_800_000_000.0
SRC4, DST4 = bytes([198, 51, 100, 10]), bytes([198, 51, 100, 1])
SRC6 = bytes.fromhex("20010db8" + "0" * 22 + "10")
DST6 = bytes.fromhex("20010db8" + "0" * 22 + "01")


def udp(payload: bytes, dport: int = 62201) -> bytes:
    # The checksum is not the daemon's business (the kernel checked it, or not).
    return struct.pack("!HHHH", 40000, dport, 8 + len(payload), 0) + payload


def udp6(src: bytes, dst: bytes, payload: bytes, dport: int = 62201) -> bytes:
    seg = udp(payload, dport)
    return struct.pack("!IHBB16s16s", 6 << 28, len(seg), 17, 64, src, dst) + seg


def syn6(src: bytes, dst: bytes, seg: bytes) -> bytes:
    return v6(src, dst, [], seg)


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[Service]:
    b64 = base64.b64encode
    (tmp_path / "users.toml").write_text(
        f'[users.alice]\nfwknop_key_base64 = "{b64(KEY).decode()}"\n'
        f'fwknop_hmac_key_base64 = "{b64(HMAC_KEY).decode()}"\n'
    )
    (tmp_path / "users.toml").chmod(0o600)
    (tmp_path / "nfknock.toml").write_text(
        f'[[protect]]\nport = 22\n[state]\npath = "{tmp_path}/state.db"\n'
        f'[users]\nfile = "users.toml"\n[control]\nsocket = "{tmp_path}/ctl.sock"\n'
    )
    service = Service(load_config(tmp_path / "nfknock.toml"), EventLogger(), lambda: WALL)
    service.restore()
    yield service
    service.stop()


def packet() -> bytes:
    return encode_access(ClientKeys(KEY, HMAC_KEY), username="alice", timestamp=int(WALL))


FORMS = {
    "udp4": lambda: v4(SRC4, DST4, udp(packet()), proto=17),
    "udp6": lambda: udp6(SRC6, DST6, packet()),
    "syn4": lambda: v4(SRC4, DST4, syn_segment(SRC4, DST4, 40000, 62201, 1, packet())),
    "syn6": lambda: syn6(SRC6, DST6, syn_segment(SRC6, DST6, 40000, 62201, 1, packet())),
}


@pytest.mark.parametrize("form", FORMS)
def test_every_queued_form_of_an_spa_packet_opens_for_its_source(svc: Service, form: str) -> None:
    six = form.endswith("6")
    src, dst = (SRC6, DST6) if six else (SRC4, DST4)
    syn = tcp_syn(src, dst, 22)
    protected = v6(src, dst, [], syn) if six else v4(src, dst, syn)
    assert svc.verdict_for(protected) is Verdict.DROP  # closed before
    assert svc.verdict_for(FORMS[form]()) is Verdict.DROP  # SPA packets: always DROP
    assert svc.spa_results == {"spa_accepted": 1} and svc.malformed == 0
    assert svc.verdict_for(protected) is Verdict.ACCEPT


def test_udp_to_another_port_is_malformed_not_spa(svc: Service) -> None:
    assert svc.verdict_for(udp6(SRC6, DST6, packet(), dport=9999)) is Verdict.DROP
    assert svc.verdict_for(v4(SRC4, DST4, udp(packet(), dport=9999), proto=17)) is Verdict.DROP
    assert svc.spa_results == {} and svc.malformed == 2


def test_a_future_stamped_packet_refused_then_resent_after_a_restart_is_a_replay(
    tmp_path: Path,
) -> None:
    """Refused when it arrives (stamped 200 s ahead), it becomes valid 80 s later; its
    digest must be on disk by then, or a restart would let a sniffed copy in."""
    b64 = base64.b64encode
    (tmp_path / "users.toml").write_text(
        f'[users.alice]\nfwknop_key_base64 = "{b64(KEY).decode()}"\n'
        f'fwknop_hmac_key_base64 = "{b64(HMAC_KEY).decode()}"\n'
    )
    (tmp_path / "users.toml").chmod(0o600)
    (tmp_path / "nfknock.toml").write_text(
        f'[[protect]]\nport = 22\n[state]\npath = "{tmp_path}/state.db"\n'
        f'[users]\nfile = "users.toml"\n[control]\nsocket = "{tmp_path}/ctl.sock"\n'
    )
    cfg = load_config(tmp_path / "nfknock.toml")
    now = [WALL]
    future = encode_access(ClientKeys(KEY, HMAC_KEY), username="alice", timestamp=int(WALL) + 200)
    datagram = v4(SRC4, DST4, udp(future), proto=17)
    first = Service(cfg, EventLogger(), lambda: now[0])
    first.restore()
    assert first.verdict_for(datagram) is Verdict.DROP
    assert first.spa_results == {"spa_from_future": 1}
    first.flush_claims()
    first.store.call(lambda s: s.close())  # kill -9: nothing saved at exit
    first.store.close()
    now[0] = WALL + 100  # inside the packet's window now
    second = Service(cfg, EventLogger(), lambda: now[0])
    second.restore()
    try:
        assert second.verdict_for(datagram) is Verdict.DROP
        assert second.spa_results == {"spa_replay": 1}
        syn = tcp_syn(SRC4, DST4, 22)
        assert second.verdict_for(v4(SRC4, DST4, syn)) is Verdict.DROP  # nothing opened
    finally:
        second.stop()
