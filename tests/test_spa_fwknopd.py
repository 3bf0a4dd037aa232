"""Our encoder's packets are accepted by the real ``fwknopd`` (Debian 12, 2.6.10).

Offline: the packet goes into a pcap file that ``fwknopd --test --pcap-file``
reads (``--test``: no firewall change; ``-C 1``: exit after one packet), run in a
throw-away network namespace (``unshare -n``) so nothing it might do to iptables can
reach the host.  Under CI=true a missing tool is a failure, not a skip.
"""

from __future__ import annotations

import base64
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from nfknock.spa.crypto import HMAC_DIGESTS
from nfknock.spa.encode import ClientKeys, encode_access

from .spa_support import DST, HMAC_KEY, KEY, OTHER_KEY, SRC

ACCEPTED = "--test mode enabled, skipping firewall manipulation"
Fwknopd = Callable[..., str]


def pcap(payload: bytes) -> bytes:
    """A pcap file (Ethernet) holding one IPv4 UDP datagram to port 62201."""
    udp = struct.pack("!HHHH", 40000, 62201, 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, SRC, DST)
    total = sum(struct.unpack("!10H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    header = header[:10] + struct.pack("!H", ~total & 0xFFFF) + header[12:]
    frame = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + header + udp
    head = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    return head + struct.pack("<IIII", int(time.time()), 0, len(frame), len(frame)) + frame


@pytest.fixture
def fwknopd(tmp_path: Path) -> Fwknopd:
    exe, unshare = shutil.which("fwknopd"), shutil.which("unshare")
    if exe is None or unshare is None or os.geteuid() != 0:
        why = "needs fwknopd (Debian fwknop-server), unshare and root"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    (tmp_path / "run").mkdir()
    conf = tmp_path / "fwknopd.conf"
    conf.write_text(
        "PCAP_INTF lo\n"
        f"FWKNOP_RUN_DIR {tmp_path / 'run'}\n"
        "ENABLE_DIGEST_PERSISTENCE N\nFLUSH_IPT_AT_INIT N\nFLUSH_IPT_AT_EXIT N\n"
    )
    conf.chmod(0o600)

    def run(payload: bytes, mode: str = "cbc", hmac_digest: str | None = "sha256") -> str:
        access = tmp_path / "access.conf"
        lines = [
            "SOURCE ANY",
            f"KEY_BASE64 {base64.b64encode(KEY).decode()}",
            f"ENCRYPTION_MODE {mode}",
            "OPEN_PORTS tcp/22",
        ]
        if hmac_digest is not None:
            lines += [
                f"HMAC_KEY_BASE64 {base64.b64encode(HMAC_KEY).decode()}",
                f"HMAC_DIGEST_TYPE {hmac_digest}",
            ]
        access.write_text("\n".join(lines) + "\n")
        access.chmod(0o600)
        (tmp_path / "spa.pcap").write_bytes(pcap(payload))
        cmd = [unshare, "-n", exe, "-f", "-t", "-v", "-v", "-C", "1"]
        cmd += ["--pcap-file", str(tmp_path / "spa.pcap"), "-c", str(conf), "-a", str(access)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        return done.stdout + done.stderr

    return run


def ours(mode: str = "cbc", hmac_digest: str = "sha256", **kw: object) -> bytes:
    keys = ClientKeys(KEY, HMAC_KEY, hmac_digest, mode)
    args: dict[str, object] = {
        "username": "alice",
        "timestamp": int(time.time()),
        "allow_ip": "198.51.100.10",
    }
    args.update(kw)
    return encode_access(keys, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["cbc", "cfb", "ofb", "ctr", "ecb"])
def test_fwknopd_accepts_our_packets_in_every_mode(fwknopd: Fwknopd, mode: str) -> None:
    log = fwknopd(ours(mode=mode), mode=mode)
    assert ACCEPTED in log, log


@pytest.mark.parametrize("hmac_digest", list(HMAC_DIGESTS))
def test_fwknopd_accepts_our_hmac_of_every_digest(fwknopd: Fwknopd, hmac_digest: str) -> None:
    log = fwknopd(ours(hmac_digest=hmac_digest), hmac_digest=hmac_digest)
    assert ACCEPTED in log, log


@pytest.mark.parametrize("digest", list(HMAC_DIGESTS))
def test_fwknopd_accepts_our_inner_digest_of_every_type(fwknopd: Fwknopd, digest: str) -> None:
    assert ACCEPTED in fwknopd(ours(digest=digest))


def test_fwknopd_accepts_our_client_timeout_and_legacy_packets(fwknopd: Fwknopd) -> None:
    log = fwknopd(ours(client_timeout=45))
    assert ACCEPTED in log and "Client Timeout: 45" in log
    legacy = encode_access(
        ClientKeys(KEY, None, mode="legacy"), username="alice", timestamp=int(time.time())
    )
    assert ACCEPTED in fwknopd(legacy, mode="legacy", hmac_digest=None)


def test_fwknopd_refuses_our_packet_under_another_key(fwknopd: Fwknopd) -> None:
    keys = ClientKeys(KEY, OTHER_KEY)
    payload = encode_access(keys, username="alice", timestamp=int(time.time()))
    assert ACCEPTED not in fwknopd(payload)
