"""Grant prefixes against the real kernel: a knock (or an SPA packet) from one address
of a client's network opens the protected port for another address of it -- a phone
moved within its carrier's pool, an IPv6 privacy address rotated within its /64 -- and
with the default prefixes it does not.

One lab and one daemon serve the module (``door``): ``wide`` opens its IPv4 /24 and
IPv6 /64, ``exact`` has the defaults (/32, /128), ``pool`` opens a /25 and a /120 (so
that an address outside its prefix still lies in the lab's documentation ranges).
Every test uses the grants it opens (``max_connections = 1``) or lets them expire
(``open_seconds``), and knocks with counters of its own, so the tests do not see each
other.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nfknock.netlab import CLIENT4, CLIENT6, SERVER4, SERVER6, Lab
from nfknock.sequence import SequenceParams, format_base32, sequence_at

from .conftest import OTHER_SECRET, SECRET, _require_lab
from .test_spa_kernel import BOB_HMAC, BOB_KEY, HMAC_KEY, KEY, fwknop

pytestmark = pytest.mark.kernel

PARAMS = SequenceParams(exclude=frozenset({22}))
POOL_SECRET = bytes(range(150, 182))
SECRETS = {"wide": SECRET, "exact": OTHER_SECRET, "pool": POOL_SECRET}
NEIGHBOUR4, OUTSIDE4 = "198.51.100.11", "198.51.100.200"  # .200: outside the /25
NEIGHBOUR6, ROTATED6 = "2001:db8::11", "2001:db8::12"
OUTSIDE6 = "2001:db8::1:10"  # outside 2001:db8::/120, inside the lab's /64


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


USERS = f"""
[users.wide]
secret = "{format_base32(SECRET)}"
grant_prefix_v4 = 24
grant_prefix_v6 = 64
fwknop_key_base64 = "{b64(KEY)}"
fwknop_hmac_key_base64 = "{b64(HMAC_KEY)}"

[users.exact]
secret = "{format_base32(OTHER_SECRET)}"
fwknop_key_base64 = "{b64(BOB_KEY)}"
fwknop_hmac_key_base64 = "{b64(BOB_HMAC)}"

[users.pool]
secret = "{format_base32(POOL_SECRET)}"
grant_prefix_v4 = 25
grant_prefix_v6 = 120
"""


@dataclass
class Door:
    lab: Lab
    cfg: Path
    counters: dict[tuple[str, int], int]

    def knock(self, user: str, address: str, source: str, until: int = 32) -> tuple[int, ...]:
        """Knock ``user``'s next sequence of this step from ``source`` (its first
        ``until`` knocks); the ports, for the rest."""
        now = time.time()
        if now % PARAMS.step_seconds > PARAMS.step_seconds - 2.0:
            time.sleep(2.5)  # knock and connect within one step
            now = time.time()
        step = int(now // PARAMS.step_seconds)
        counter = self.counters.get((user, step), 0)
        self.counters[(user, step)] = counter + 1
        ports = sequence_at(SECRETS[user], now, counter, PARAMS)
        self.lab.send_knocks(address, ports[:until], source=source)
        return ports

    def probe(self, address: str, source: str) -> str:
        return str(self.lab.probe(address, 22, timeout=3.0, source=source)["result"])

    def shut(self, address: str, source: str) -> str:
        """A probe expected to time out: a short timeout (a grant answers in ms)."""
        return str(self.lab.probe(address, 22, timeout=1.0, source=source)["result"])


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Door]:
    _require_lab()
    with Lab(tmp_path_factory.mktemp("prefix")) as lab:
        for cidr in (f"{NEIGHBOUR4}/24", f"{OUTSIDE4}/24"):
            lab.add_client_address(cidr)
        for cidr in (f"{NEIGHBOUR6}/64", f"{ROTATED6}/64", f"{OUTSIDE6}/64"):
            lab.add_client_address(cidr)
        lab.start_service()
        cfg = lab.write_config({}, door={"open_seconds": 8.0})
        users = lab.workdir / "users.toml"
        users.write_text(USERS)
        users.chmod(0o600)
        lab.install_rules(cfg)
        lab.start_daemon(cfg)
        yield Door(lab, cfg, {})


# --- knocks ---------------------------------------------------------------------------------


def test_a_knock_from_one_address_of_a_24_opens_for_another_with_grant_prefix_v4_24(
    door: Door,
) -> None:
    door.knock("wide", SERVER4, CLIENT4)
    assert door.probe(SERVER4, NEIGHBOUR4) == "open"
    assert door.shut(SERVER4, CLIENT4) == "timeout"  # one connection, for the whole /24


def test_a_knock_from_one_address_of_a_64_opens_for_another_with_grant_prefix_v6_64(
    door: Door,
) -> None:
    door.knock("wide", SERVER6, CLIENT6)
    assert door.probe(SERVER6, NEIGHBOUR6) == "open"


@pytest.mark.parametrize(
    ("server", "client", "neighbour"),
    [(SERVER4, CLIENT4, NEIGHBOUR4), (SERVER6, CLIENT6, NEIGHBOUR6)],
    ids=["ipv4", "ipv6"],
)
def test_with_the_default_prefixes_only_the_knocking_address_opens(
    door: Door, server: str, client: str, neighbour: str
) -> None:
    door.knock("exact", server, client)
    assert door.shut(server, neighbour) == "timeout"
    assert door.probe(server, client) == "open"


def test_an_address_outside_the_users_prefix_does_not_open(door: Door) -> None:
    door.knock("pool", SERVER4, CLIENT4)
    assert door.shut(SERVER4, OUTSIDE4) == "timeout"  # 198.51.100.200: not in .0/25
    assert door.probe(SERVER4, NEIGHBOUR4) == "open"
    door.knock("pool", SERVER6, CLIENT6)
    assert door.shut(SERVER6, OUTSIDE6) == "timeout"  # 2001:db8::1:10: not in ::/120
    assert door.probe(SERVER6, NEIGHBOUR6) == "open"


def test_a_sequence_knocked_across_a_rotating_ipv6_address_completes(door: Door) -> None:
    """Progress is keyed by the widest prefix (wide's /64): half the knocks from one
    privacy address, half from the next, the connection from a third."""
    ports = door.knock("wide", SERVER6, CLIENT6, until=16)
    door.lab.send_knocks(SERVER6, ports[16:], source=NEIGHBOUR6)
    assert door.probe(SERVER6, ROTATED6) == "open"


# --- SPA -------------------------------------------------------------------------------------


def test_an_spa_opening_covers_the_users_24(door: Door) -> None:
    fwknop(door.lab, "-a", CLIENT4)  # wide's keys, sent from and naming 198.51.100.10
    assert door.probe(SERVER4, NEIGHBOUR4) == "open"


def test_an_spa_opening_with_the_default_prefix_covers_the_address_only(door: Door) -> None:
    fwknop(door.lab, "-a", CLIENT4, key=BOB_KEY, hmac_key=BOB_HMAC)  # exact's keys
    assert door.shut(SERVER4, NEIGHBOUR4) == "timeout"
    assert door.probe(SERVER4, CLIENT4) == "open"


def test_the_daemon_lists_prefix_grants_with_their_length(door: Door) -> None:
    door.knock("wide", SERVER6, CLIENT6)
    status: dict[str, Any] = json.loads(
        door.lab.nfknock("status", "--json", "--config", str(door.cfg)).stdout
    )
    grants = [g for g in status["grants"] if g["user"] == "wide"]
    assert [(g["source"], g["prefix"]) for g in grants] == [("2001:db8::/64", 64)]
    assert door.probe(SERVER6, NEIGHBOUR6) == "open"  # and use it
