"""rediss://: the Redis store talks TLS, verifies the server's certificate against
[state] ca_file and its name against the URL's host -- a wrong CA or a wrong name
fails closed.  A real redis-server with TLS, in a namespace of the test's own."""

from __future__ import annotations

import datetime
import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nfknock.netlab import PY, run
from nfknock.netlab.redisd import RedisServer

from ..conftest import require_redis
from .conftest import _require_lab

pytestmark = pytest.mark.kernel

PROBE = """
import json, sys
from pathlib import Path
from nfknock.config import StateConfig
from nfknock.gate import ClaimRequest, CounterClaim
from nfknock.store.redis import RedisStore
url, ca = sys.argv[1], sys.argv[2]
state = StateConfig("redis", url, prefix="tls", ca_file=Path(ca), timeout=2.0)
store = RedisStore(state, origin="tls")
store.begin()
claim = CounterClaim("alice", 100, int(sys.argv[3]), 2)
out = store.claim(ClaimRequest(1, claim, bytes(8), "alice", frozenset({22}), 1, 2e9, "knock"), 1e9)
print(json.dumps({"outcome": out.outcome.value, "detail": out.detail}))
"""


Issuer = tuple[x509.Name, ec.EllipticCurvePrivateKey]


def _pem_pair(
    directory: Path, name: str, issuer: Issuer | None, san: list[x509.GeneralName] | None
) -> tuple[Path, ec.EllipticCurvePrivateKey, x509.Name]:
    """A certificate (self-signed CA when ``issuer`` is None) and its key, in PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    sign_name, sign_key = issuer or (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(sign_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = builder.sign(sign_key, hashes.SHA256())
    path = directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (directory / f"{name}.key").chmod(0o600)
    return path, key, subject


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """(namespace, the CA that signed the server, another CA)."""
    _require_lab()
    require_redis()
    ns = f"nfktls{os.getpid() % 100000}{secrets.token_hex(2)}"
    run(["ip", "netns", "add", ns])
    try:
        run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"])
        ca, ca_key, ca_name = _pem_pair(tmp_path, "ca", None, None)
        other, _, _ = _pem_pair(tmp_path, "other-ca", None, None)
        cert, _, _ = _pem_pair(tmp_path, "server", (ca_name, ca_key), [x509.DNSName("localhost")])
        server = RedisServer(
            tmp_path / "redis",
            address="127.0.0.1",  # the namespace's own loopback
            port=6380,
            netns=ns,
            tls=(cert, tmp_path / "server.key", ca),
        )
        server.start()
        try:
            yield ns, ca, other
        finally:
            server.stop()
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False, timeout=30)


def claim(ns: str, url: str, ca: Path, counter: int) -> dict[str, str]:
    done = run(["ip", "netns", "exec", ns, PY, "-c", PROBE, url, str(ca), str(counter)])
    result: dict[str, str] = json.loads(done.stdout)
    return result


def test_rediss_verifies_the_certificate_and_the_name_and_fails_closed_otherwise(
    tls_redis: tuple[str, Path, Path],
) -> None:
    ns, ca, other = tls_redis
    assert claim(ns, "rediss://localhost:6380/0", ca, 0)["outcome"] == "won"
    wrong_ca = claim(ns, "rediss://localhost:6380/0", other, 1)
    assert wrong_ca["outcome"] == "failed" and "certificate verify failed" in wrong_ca["detail"]
    wrong_name = claim(ns, "rediss://127.0.0.1:6380/0", ca, 1)  # the certificate says localhost
    assert wrong_name["outcome"] == "failed" and "127.0.0.1" in wrong_name["detail"]
