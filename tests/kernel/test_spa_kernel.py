"""SPA against the real kernel: the real Debian ``fwknop`` client opens nfknock's door
through the priority queue; nothing it should not opens."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from nfknock.netlab import CLIENT4, SERVER4, Lab
from nfknock.sequence import format_base32

from .conftest import SECRET
from .test_daemon_kernel import events

pytestmark = pytest.mark.kernel

KEY = bytes(range(100, 132))
HMAC_KEY = bytes(range(1, 65))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def spa_setup(lab: Lab, extra_user: str = "", **sections: dict[str, object]) -> Path:
    lab.start_service()
    cfg = lab.write_config({"alice": SECRET}, **sections)
    users = lab.workdir / "users.toml"
    users.write_text(
        f'[users.alice]\nsecret = "{format_base32(SECRET)}"\n'
        f'fwknop_key_base64 = "{b64(KEY)}"\nfwknop_hmac_key_base64 = "{b64(HMAC_KEY)}"\n'
        + extra_user
    )
    lab.install_rules(cfg)
    lab.start_daemon(cfg)
    return cfg


def fwknop(lab: Lab, *args: str, key: bytes = KEY, hmac_key: bytes = HMAC_KEY) -> None:
    exe = shutil.which("fwknop")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the fwknop client (Debian fwknop-client) is not installed")
        pytest.skip("the fwknop client is not installed")
    home = lab.workdir / "fwknop-home"
    home.mkdir(exist_ok=True)
    rc = home / ".fwknoprc"
    rc.touch(mode=0o600)
    argv = [exe, "-D", SERVER4, "--no-save-args", "--rc-file", str(rc), "--use-hmac"]
    argv += ["--key-base64-rijndael", b64(key), "--key-base64-hmac", b64(hmac_key)]
    if "-A" not in args:
        argv += ["-A", "tcp/22"]
    if "-s" not in args and "-a" not in args:
        argv += ["-a", CLIENT4]
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    done = subprocess.run(
        ["ip", "netns", "exec", lab.client, *argv, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_the_real_fwknop_client_opens_port_22_once(lab: Lab) -> None:
    spa_setup(lab)
    assert lab.probe(SERVER4)["result"] == "timeout"
    fwknop(lab)
    assert lab.probe(SERVER4)["result"] == "open"
    assert lab.probe(SERVER4)["result"] == "timeout"  # one connection per opening
    assert [e["code"] for e in events(lab, "spa_accepted")] == ["spa_accepted"]


def test_a_saved_packet_replayed_opens_nothing_also_after_kill_9(lab: Lab) -> None:
    cfg = spa_setup(lab)
    saved = lab.workdir / "saved.spa"
    fwknop(lab, "-B", str(saved))
    assert lab.probe(SERVER4)["result"] == "open"
    payload = saved.read_text().strip()
    send = [
        "ip", "netns", "exec", lab.client, "python3", "-c",
        "import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
        f"s.sendto(sys.argv[1].encode(),('{SERVER4}',62201))",
        payload,
    ]  # fmt: skip
    subprocess.run(send, check=True, timeout=10)
    assert lab.probe(SERVER4)["result"] == "timeout"
    lab.stop_daemon(signal.SIGKILL)
    lab.start_daemon(cfg)
    subprocess.run(send, check=True, timeout=10)
    assert lab.probe(SERVER4)["result"] == "timeout"
    codes = [e["code"] for e in events(lab, "spa_refused")]
    assert codes == ["spa_replay", "spa_replay"]


def test_a_wrong_encryption_or_hmac_key_opens_nothing(lab: Lab) -> None:
    spa_setup(lab)
    fwknop(lab, key=bytes(32))
    fwknop(lab, hmac_key=bytes(64))
    assert lab.probe(SERVER4)["result"] == "timeout"
    codes = [e["code"] for e in events(lab, "spa_refused")]
    assert codes == ["spa_decrypt_failed", "spa_no_hmac_match"]
