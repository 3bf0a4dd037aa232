"""The static rules of forwarded doors (``[[door.forward]]``, nfknock.door): text only.

:mod:`nfknock.render` places these in its output; nothing here is installed by
itself.  nfknock owns two more chains for doors, both jumped to from rule 1 of
``PREROUTING``: ``NFKNOCK-DOOR`` in the mangle table and ``NFKNOCK-DNAT`` in the
nat table (nftables: the chains ``door_queue`` and ``door_nat`` of ``inet
nfknock``).  Only entries that can serve a family are rendered in it (an entry
with an IPv4 ``address`` has no IPv6 rules); their door ranges are closed in both.
(The nftables table is ``inet``: every range is queued for both families, and the
daemon drops a door knocked over the family its target does not have.)

The order is the security argument:

mangle PREROUTING, ``NFKNOCK-DOOR`` (before NAT, so the daemon sees the door
port the client chose and the translation can follow its verdict):

1. ``lo`` returns (local traffic is never queued, as in the filter chains).
2. Packets carrying the reject mark return: the daemon's REJECT is ``set_mark`` +
   ``repeat()``, which re-runs this hook; without this rule the repeated SYN
   would be queued again, for ever.  It returns to the filter table's reject rule.
3. New SYNs to a door range, addressed to this host (``addrtype LOCAL``: traffic
   routed through a gateway to other hosts' ports is not ours) -> the priority
   queue.  The daemon answers DROP (no grant: like a knock), REJECT (behind) or
   ACCEPT with the entry's mark.

nat PREROUTING, ``NFKNOCK-DNAT``: per entry, a SYN carrying its mark to its door
range is translated to the target (``DNAT --to-destination ADDRESS:PORT``, or
``:PORT`` -- this host, the address the client used; nftables 1.0 cannot leave
the address alone and uses ``redirect to :PORT``, the incoming interface's
address).  Only the daemon sets the mark, on one packet: nothing else matches.

filter, in ``NFKNOCK-INPUT`` (a local target) or ``NFKNOCK-FORWARD`` (a target
behind this gateway), rules 4 and 5 before the reject, SPA and protected-port
rules, rule 6 right after the reject rule (a REJECTed door SYN -- the source is
"behind" -- must reach it):

4. the marked SYN that conntrack translated from one of the entry's doors, to the
   target -> ACCEPT (the only way in through a door);
5. a target that is not a ``[[protect]]`` port: its established connections (both
   directions through a gateway) -> ACCEPT, anything else to it -> DROP, so the
   service port is closed to everyone; a protected target keeps its own rules
   (queued, opened only by a grant for that port -- door users get none);
6. anything else to a door port (``NFKNOCK-INPUT``) -> DROP.
"""

from __future__ import annotations

from nfknock.config import Config, Forward, IPAddress

DOOR_CHAIN = "NFKNOCK-DOOR"  # mangle
DNAT_CHAIN = "NFKNOCK-DNAT"  # nat
# table -> hook -> nfknock's chain jumped to from rule 1 of that hook.
DOOR_HOOKS = {"nat": {"PREROUTING": DNAT_CHAIN}, "mangle": {"PREROUTING": DOOR_CHAIN}}
SYN_ONLY = "--tcp-flags SYN,ACK,FIN,RST SYN"
NFT_SYN = "tcp flags & (fin|syn|rst|ack) == syn"


def serving(cfg: Config, family: int) -> list[Forward]:
    """The entries whose doors work over this address family."""
    return [f for f in cfg.door.forward if f.address is None or f.address.version == family]


def _target(f: Forward) -> str:
    if f.address is None:
        return f":{f.port}"
    host = f"[{f.address}]" if f.address.version == 6 else str(f.address)
    return f"{host}:{f.port}"


def _protected(cfg: Config, f: Forward) -> bool:
    """Is the target a [[protect]] entry (then it keeps its own rules)?"""
    return any(p.port == f.port and p.address == f.address for p in cfg.protect)


def door_sections(cfg: Config, family: int, queue: str) -> list[str]:
    """The ``*nat`` and ``*mangle`` sections (after the filter table's COMMIT: a
    restore commits table by table, and each state in between is closed -- see
    nfknock.rules), or nothing without doors.  ``queue``: the priority queue's
    iptables target."""
    if not cfg.door.forward:
        return []
    reject = f"0x{cfg.queue.reject_mark:x}"
    entries = serving(cfg, family)
    nat = [
        f"-A {DNAT_CHAIN} -p tcp -m mark --mark 0x{f.mark:x} --dport {f.door_min}:{f.door_max} "
        f"-j DNAT --to-destination {_target(f)}"
        for f in entries
    ]
    mangle = [
        f"-A {DOOR_CHAIN} -i lo -j RETURN",
        f"-A {DOOR_CHAIN} -m mark --mark {reject} -j RETURN",
    ]
    mangle += [
        f"-A {DOOR_CHAIN} -p tcp -m addrtype --dst-type LOCAL --dport {f.door_min}:{f.door_max} "
        f"{SYN_ONLY} -m conntrack --ctstate NEW -j {queue}"
        for f in entries
    ]
    nat_section = ["*nat", f":{DNAT_CHAIN} - [0:0]", *nat, "COMMIT"]
    return [*nat_section, "*mangle", f":{DOOR_CHAIN} - [0:0]", *mangle, "COMMIT"]


def _hook(f: Forward) -> str:
    return "INPUT" if f.address is None else "FORWARD"


def door_hooks(cfg: Config, family: int) -> set[str]:
    """The filter hooks door rules need in this family: INPUT for the door ports
    (always local), FORWARD for targets behind this gateway."""
    if not cfg.door.forward:
        return set()
    return {"INPUT"} | {_hook(f) for f in serving(cfg, family)}


def door_filter_rules(cfg: Config, family: int, hook: str) -> list[str]:
    """Rules 4-5 of the module docstring for one filter chain (iptables form)."""
    out: list[str] = []
    for f in serving(cfg, family):
        if _hook(f) != hook:
            continue
        d = f"-d {f.address} " if f.address else ""
        s = f"-s {f.address} " if f.address else ""
        out.append(
            f"-p tcp {d}--dport {f.port} {SYN_ONLY} -m mark --mark 0x{f.mark:x} -m conntrack "
            f"--ctstate DNAT --ctorigdstport {f.door_min}:{f.door_max} -j ACCEPT"
        )
        if not _protected(cfg, f):
            established = "-m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
            out.append(f"-p tcp {d}--dport {f.port} {established}")
            if f.address:
                out.append(f"-p tcp {s}--sport {f.port} {established}")
            out.append(f"-p tcp {d}--dport {f.port} -j DROP")
    return out


def door_drop_rules(cfg: Config, hook: str) -> list[str]:
    """Rule 6 (iptables form): the door ports themselves, in ``NFKNOCK-INPUT``."""
    if hook != "INPUT":
        return []
    return [f"-p tcp --dport {f.door_min}:{f.door_max} -j DROP" for f in cfg.door.forward]


# --- nftables ----------------------------------------------------------------------


def _nft_addr(a: IPAddress, way: str) -> str:
    return f"{'ip' if a.version == 4 else 'ip6'} {way} {a} "


def nft_door_chains(cfg: Config, queue: str) -> list[str]:
    """The ``door_queue`` (mangle priority) and ``door_nat`` chains; ``queue``: the
    priority queue statement."""
    if not cfg.door.forward:
        return []
    reject = f"0x{cfg.queue.reject_mark:08x}"
    ranges = ", ".join(f"{f.door_min}-{f.door_max}" for f in cfg.door.forward)
    out = [
        "\tchain door_queue {",
        "\t\ttype filter hook prerouting priority mangle - 10; policy accept;",
        '\t\tiifname "lo" return',
        f"\t\tmeta mark {reject} return",
        f"\t\tfib daddr type local tcp dport {{ {ranges} }} {NFT_SYN} ct state new {queue}",
        "\t}",
        "\tchain door_nat {",
        "\t\ttype nat hook prerouting priority dstnat - 10; policy accept;",
    ]
    for f in cfg.door.forward:
        match = f"meta mark 0x{f.mark:08x} tcp dport {f.door_min}-{f.door_max}"
        if f.address is None:
            out.append(f"\t\t{match} redirect to :{f.port}")
        else:
            fam = "ip" if f.address.version == 4 else "ip6"
            out.append(f"\t\t{match} dnat {fam} to {_target(f)}")
    out.append("\t}")
    return out


def nft_door_rules(cfg: Config, hook: str) -> list[str]:
    """Rules 4-5 for the nftables ``input`` / ``forward`` chain."""
    out: list[str] = []
    for f in cfg.door.forward:
        if _hook(f) != hook:
            continue
        d = _nft_addr(f.address, "daddr") if f.address else ""
        s = _nft_addr(f.address, "saddr") if f.address else ""
        out.append(
            f"\t\t{d}tcp dport {f.port} {NFT_SYN} meta mark 0x{f.mark:08x} ct status dnat "
            f"ct original proto-dst {f.door_min}-{f.door_max} accept"
        )
        if not _protected(cfg, f):
            out.append(f"\t\t{d}tcp dport {f.port} ct state established,related accept")
            if f.address:
                out.append(f"\t\t{s}tcp sport {f.port} ct state established,related accept")
            out.append(f"\t\t{d}tcp dport {f.port} drop")
    return out


def nft_door_drops(cfg: Config, hook: str) -> list[str]:
    """Rule 6 for the nftables ``input`` chain."""
    if hook != "INPUT":
        return []
    return [f"\t\ttcp dport {f.door_min}-{f.door_max} drop" for f in cfg.door.forward]
