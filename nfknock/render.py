"""The static ruleset as text: iptables-restore (IPv4, IPv6), nftables, AWS security groups.

Pure functions of the configuration; :mod:`nfknock.rules` installs them.  The rules
never change at run time.  nfknock owns exactly the chains ``NFKNOCK-INPUT`` /
``NFKNOCK-FORWARD`` (jumped to from rule 1 of ``INPUT`` / ``FORWARD`` in the filter
table) and ``NFKNOCK-SPA`` (jumped to only from those two) -- with forwarded doors
also ``NFKNOCK-DOOR`` (mangle) and ``NFKNOCK-DNAT`` (nat), jumped to from rule 1
of ``PREROUTING`` (:mod:`nfknock.render_door` has their rules and their order) --
or the nftables table ``inet nfknock``; it never flushes anything else, never
changes a policy and never touches another rule.

Two queues (``[queue]``): the *priority* queue ``number`` takes what must be answered
at once -- new SYNs to protected ports and SPA packets -- and the *knock* queue
``knock_number`` takes SYNs to the knock range, so a flood of knocks cannot delay a
granted connection or an SPA packet.  With ``workers`` > 1 each is a range
(``--queue-balance a:b`` / ``queue num a-b``).  Neither has ``--queue-bypass``: with
no daemon bound the kernel drops what would be queued (fail closed).

Order inside each chain -- the order is the security argument:

1. ``lo`` returns (local services are not knock targets).
2. Established/related traffic of the protected ports is accepted: a connection the
   daemon once accepted outlives its grant and daemon restarts.
3. The static allowlist (``[[allow]]``) is accepted: the admins' break-glass.  It
   names protected ports only.
3b. Forwarded doors (render_door, rules 4-5 there): the marked SYN translated from
   a door is accepted; an unprotected target is closed to everything else.
   Nothing here is queued.  (Right after 4., rule 6 there: anything else to a door
   port is dropped -- after, so that a door SYN the daemon REJECTs gets its reset.)
4. Packets carrying nfknock's reject mark get a TCP reset.  The daemon's REJECT is
   ``set_mark`` + ``repeat()``, which re-runs the hook, so this rule must come before
   every queue rule (else a repeated packet would be queued again, forever).
5. SPA (``[spa] ports``, only when set): UDP datagrams and TCP SYNs (fwknop's
   ``-P tcpraw`` puts the payload in a SYN) go to ``NFKNOCK-SPA``; any other TCP to
   those ports is dropped.  The SYN rule has no conntrack state match: fwknop 2.6.10's
   ``tcpraw`` SYN carries a TCP checksum of zero, which conntrack marks INVALID (not
   NEW), and nothing to an SPA port is ever accepted, so no state but "new" or
   "invalid" can occur there.  ``NFKNOCK-SPA`` drops above the per-source rate first
   (IPv4 per address, IPv6 per /64: one source can only spend its own budget, never
   the global one), then above the global rate (the bound on what SPA can put on the
   priority queue, whatever the number of sources), and queues the rest to the
   priority queue; nothing leaves it otherwise.  These rules sit before 7. because an
   SPA port inside the knock range must be in ``exclude`` (config.py), whose
   ``RETURN`` would otherwise let SPA SYNs past nfknock; SPA ports and protected ports
   are disjoint (config.py), so 5. and 6. never compete.
6. New SYNs to the protected ports go to the priority queue; anything else to a
   protected port is dropped.
7. Excluded ports return (public services the admin accepts later).
8. New SYNs to the knock range go to the knock queue.

Rate limits, iptables: ``hashlimit`` (the ``limit`` match cannot express more than
10,000/s).  A hashlimit table is shared by every rule of its name and keeps the rate
of the rule that created it -- a re-install with new rates under the old name would
silently keep the old ones -- so the name is derived from the parameters.  When a
table is full (the kernel's ``htable-max``) new sources are dropped: fail closed.
nftables: a dynamic set per family with a ``limit`` per element; a full set skips
the per-source limit, the global limit still bounds the queue.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass

from nfknock.config import Config, ConfigError, IPAddress
from nfknock.render_door import (
    DNAT_CHAIN,
    DOOR_CHAIN,
    DOOR_HOOKS,
    door_drop_rules,
    door_filter_rules,
    door_hooks,
    door_sections,
    nft_door_chains,
    nft_door_drops,
    nft_door_rules,
)
from nfknock.schemes import merge_ranges

CHAIN = {"INPUT": "NFKNOCK-INPUT", "FORWARD": "NFKNOCK-FORWARD"}
SPA_CHAIN = "NFKNOCK-SPA"
OWNED_CHAINS = (*CHAIN.values(), SPA_CHAIN, DOOR_CHAIN, DNAT_CHAIN)
# table -> hook -> nfknock's chain entered from rule 1 of that hook; the tables in
# the order of a restore file (the filter table first: see render_door).
HOOK_CHAINS: dict[str, dict[str, str]] = {"filter": CHAIN, **DOOR_HOOKS}
TABLE_OF = {chain: table for table, hooks in HOOK_CHAINS.items() for chain in hooks.values()}
TABLE_OF[SPA_CHAIN] = "filter"
NFT_TABLE = "nfknock"
SYN_ONLY = "--tcp-flags SYN,ACK,FIN,RST SYN"
HEADER = "# nfknock static rules (generated by `nfknock rules`; do not edit)"
# iptables' hashlimit: rates up to 1,000,000/s, bursts up to 1,000,000 packets.
HASHLIMIT_MAX = 1_000_000
# The per-source unit for IPv6: one subscriber's /64 is one source.
IPV6_SOURCE_PREFIX = 64


def _chunks(ports: Iterable[int], size: int = 15) -> list[str]:
    """multiport takes at most 15 ports per rule."""
    items = sorted(ports)
    return [",".join(map(str, items[i : i + size])) for i in range(0, len(items), size)]


@dataclass(frozen=True)
class _Target:
    """Ports protected in one chain, optionally at one destination address."""

    hook: str  # INPUT | FORWARD
    address: IPAddress | None
    ports: frozenset[int]


def _targets(cfg: Config, family: int) -> list[_Target]:
    local = frozenset(p.port for p in cfg.protect if p.address is None)
    out = [_Target("INPUT", None, local)] if local else []
    by_addr: dict[IPAddress, set[int]] = {}
    for p in cfg.protect:
        if p.address is not None and p.address.version == family:
            by_addr.setdefault(p.address, set()).add(p.port)
    out += [_Target("FORWARD", a, frozenset(ps)) for a, ps in sorted(by_addr.items(), key=str)]
    return out


def knock_ranges(cfg: Config) -> list[tuple[int, int]]:
    """Where knocks can land: the [knock] range and every enabled user's scheme's."""
    ranges = [(cfg.knock.port_min, cfg.knock.port_max)]
    for user in cfg.users:
        if user.enabled and user.scheme is not None:
            ranges += user.scheme.knock_ranges()
    return merge_ranges(ranges)


def nfqueue_target(queues: range) -> str:
    """The iptables target for one queue or a balanced range (never a bypass)."""
    if len(queues) == 1:
        return f"NFQUEUE --queue-num {queues.start}"
    return f"NFQUEUE --queue-balance {queues.start}:{queues[-1]}"


def _nft_queue(queues: range) -> str:
    return f"queue num {queues.start}" + (f"-{queues[-1]}" if len(queues) > 1 else "")


def _hashlimit_name(kind: str, *params: int) -> str:
    """A name that changes with the parameters (15 characters at most)."""
    digest = hashlib.sha256(f"{kind}:{params}".encode()).hexdigest()[:6]
    return f"nfknock-{kind}{digest}"


def _spa_chain(cfg: Config, family: int) -> list[str]:
    """The rules of NFKNOCK-SPA: per-source limit, global limit, priority queue."""
    spa = cfg.spa
    for key, value in (("rate_global", spa.rate_global), ("rate_per_source", spa.rate_per_source)):
        if value > HASHLIMIT_MAX:
            raise ConfigError(
                cfg.path,
                f"spa.{key}",
                f"{value}/s is above what iptables' hashlimit can express ({HASHLIMIT_MAX}/s)",
            )
    mask = f" --hashlimit-srcmask {IPV6_SOURCE_PREFIX}" if family == 6 else ""
    per_source = _hashlimit_name("s", spa.rate_per_source, spa.rate_burst, family)
    everyone = _hashlimit_name("g", spa.rate_global, family)
    return [
        f"-m hashlimit --hashlimit-above {spa.rate_per_source}/sec --hashlimit-burst "
        f"{spa.rate_burst} --hashlimit-mode srcip{mask} --hashlimit-name {per_source} -j DROP",
        f"-m hashlimit --hashlimit-above {spa.rate_global}/sec --hashlimit-burst "
        f"{spa.rate_global} --hashlimit-name {everyone} -j DROP",
        f"-j {nfqueue_target(cfg.queue.priority_queues())}",
    ]


def render_iptables(cfg: Config, family: int) -> str:
    """An ``iptables-restore --noflush`` file for IPv4 (4) or IPv6 (6): the chain
    declarations and their rules; :mod:`nfknock.rules` adds the jumps."""
    targets = _targets(cfg, family)
    hooks = sorted({t.hook for t in targets} | door_hooks(cfg, family), key=lambda h: h != "INPUT")
    priority = nfqueue_target(cfg.queue.priority_queues())
    knock = nfqueue_target(cfg.queue.knock_queues())
    mark = f"0x{cfg.queue.reject_mark:x}"
    excluded = cfg.knock.exclude - cfg.protected_ports
    ranges = [f"{lo}:{hi}" for lo, hi in knock_ranges(cfg)]
    spa_ports = _chunks(cfg.spa.ports)
    chains = [CHAIN[h] for h in hooks] + ([SPA_CHAIN] if targets and spa_ports else [])
    lines = [HEADER, "*filter"]
    lines += [f":{c} - [0:0]" for c in chains]
    for hook in hooks:
        c = CHAIN[hook]
        rules: list[str] = []
        if hook == "INPUT":
            rules.append("-i lo -j RETURN")
        hook_targets = [t for t in targets if t.hook == hook]
        for t in hook_targets:
            d = f"-d {t.address} " if t.address else ""
            s = f"-s {t.address} " if t.address else ""
            for ports in _chunks(t.ports):
                rules.append(
                    f"-p tcp {d}-m multiport --dports {ports} "
                    "-m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
                )
                if t.address:  # replies from the host behind the gateway
                    rules.append(
                        f"-p tcp {s}-m multiport --sports {ports} "
                        "-m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
                    )
        for allow in cfg.allow:
            if allow.network.version != family:
                continue
            for t in hook_targets:
                d = f"-d {t.address} " if t.address else ""
                ports_allowed = (allow.ports & t.ports) if allow.ports else t.ports
                for ports in _chunks(ports_allowed):
                    rules.append(
                        f"-p tcp -s {allow.network} {d}-m multiport --dports {ports} -j ACCEPT"
                    )
        rules += door_filter_rules(cfg, family, hook)  # forwarded doors (render_door)
        rules.append(f"-p tcp -m mark --mark {mark} -j REJECT --reject-with tcp-reset")
        rules += door_drop_rules(cfg, hook)
        for t in hook_targets:
            d = f"-d {t.address} " if t.address else ""
            for ports in spa_ports:
                rules += [
                    f"-p udp {d}-m multiport --dports {ports} -j {SPA_CHAIN}",
                    f"-p tcp {d}-m multiport --dports {ports} {SYN_ONLY} -j {SPA_CHAIN}",
                    f"-p tcp {d}-m multiport --dports {ports} -j DROP",
                ]
        for t in hook_targets:
            d = f"-d {t.address} " if t.address else ""
            for ports in _chunks(t.ports):
                rules.append(
                    f"-p tcp {d}-m multiport --dports {ports} {SYN_ONLY} "
                    f"-m conntrack --ctstate NEW -j {priority}"
                )
                rules.append(f"-p tcp {d}-m multiport --dports {ports} -j DROP")
        for t in hook_targets:
            d = f"-d {t.address} " if t.address else ""
            for ports in _chunks(excluded):
                rules.append(f"-p tcp {d}-m multiport --dports {ports} -j RETURN")
            for knock_range in ranges:
                rules.append(
                    f"-p tcp {d}--dport {knock_range} {SYN_ONLY} "
                    f"-m conntrack --ctstate NEW -j {knock}"
                )
        lines += [f"-A {c} {r}" for r in rules]
    if SPA_CHAIN in chains:
        lines += [f"-A {SPA_CHAIN} {r}" for r in _spa_chain(cfg, family)]
    lines.append("COMMIT")
    lines += door_sections(cfg, family, priority)
    return "\n".join(lines) + "\n"


def _nft_spa(cfg: Config) -> list[str]:
    """The nftables sets and chain of the SPA rate limits (see the module docstring)."""
    spa = cfg.spa
    per_source = f"limit rate over {spa.rate_per_source}/second burst {spa.rate_burst} packets"
    v6_prefix = ":".join(["ffff"] * (IPV6_SOURCE_PREFIX // 16)) + "::"
    out = []
    for name, kind in (("spa4", "ipv4_addr"), ("spa6", "ipv6_addr")):
        out += [
            f"\tset {name} {{",
            f"\t\ttype {kind}",
            "\t\tsize 65536",
            "\t\tflags dynamic,timeout",
            "\t\ttimeout 10s",
            "\t}",
        ]
    return [
        *out,
        "\tchain spa {",
        f"\t\tupdate @spa4 {{ ip saddr {per_source} }} drop",
        f"\t\tupdate @spa6 {{ ip6 saddr and {v6_prefix} {per_source} }} drop",
        f"\t\tlimit rate over {spa.rate_global}/second burst {spa.rate_global} packets drop",
        f"\t\t{_nft_queue(cfg.queue.priority_queues())}",
        "\t}",
    ]


def render_nftables(cfg: Config) -> str:
    """An ``nft -f`` file: one table of nfknock's own, replaced atomically."""
    mark = f"0x{cfg.queue.reject_mark:08x}"
    priority = _nft_queue(cfg.queue.priority_queues())
    knock = _nft_queue(cfg.queue.knock_queues())
    syn = "tcp flags & (fin|syn|rst|ack) == syn"
    excluded = sorted(cfg.knock.exclude - cfg.protected_ports)
    spans = [f"{lo}-{hi}" for lo, hi in knock_ranges(cfg)]
    knock_range = spans[0] if len(spans) == 1 else "{ " + ", ".join(spans) + " }"
    targets = _targets(cfg, 4) + [t for t in _targets(cfg, 6) if t.address is not None]
    out = [
        "#!/usr/sbin/nft -f",
        HEADER,
        f"table inet {NFT_TABLE}",
        f"delete table inet {NFT_TABLE}",
        f"table inet {NFT_TABLE} {{",
    ]
    if cfg.spa.ports and targets:
        out += _nft_spa(cfg)
    out += nft_door_chains(cfg, priority)

    def dst(t: _Target) -> str:
        if t.address is None:
            return ""
        return f"{'ip' if t.address.version == 4 else 'ip6'} daddr {t.address} "

    def src(t: _Target) -> str:
        return dst(t).replace(" daddr ", " saddr ")

    def pset(ports: Iterable[int]) -> str:
        return "{ " + ", ".join(map(str, sorted(ports))) + " }"

    for hook in ("INPUT", "FORWARD"):
        hook_targets = [t for t in targets if t.hook == hook]
        doors = nft_door_rules(cfg, hook)
        drops = nft_door_drops(cfg, hook)
        if not hook_targets and not doors and not drops:
            continue
        out.append(f"\tchain {hook.lower()} {{")
        out.append(f"\t\ttype filter hook {hook.lower()} priority filter - 10; policy accept;")
        if hook == "INPUT":
            out.append('\t\tiifname "lo" return')
        for t in hook_targets:
            out.append(f"\t\t{dst(t)}tcp dport {pset(t.ports)} ct state established,related accept")
            if t.address is not None:
                out.append(
                    f"\t\t{src(t)}tcp sport {pset(t.ports)} ct state established,related accept"
                )
        for allow in cfg.allow:
            fam = "ip" if allow.network.version == 4 else "ip6"
            for t in hook_targets:
                if t.address is not None and t.address.version != allow.network.version:
                    continue
                ports = (allow.ports & t.ports) if allow.ports else t.ports
                if ports:
                    out.append(
                        f"\t\t{fam} saddr {allow.network} {dst(t)}tcp dport {pset(ports)} accept"
                    )
        out += doors
        out.append(f"\t\tmeta mark {mark} meta l4proto tcp reject with tcp reset")
        out += drops
        if cfg.spa.ports:
            spa = pset(cfg.spa.ports)
            for t in hook_targets:
                out += [
                    f"\t\t{dst(t)}udp dport {spa} jump spa",
                    f"\t\t{dst(t)}tcp dport {spa} {syn} jump spa",
                    f"\t\t{dst(t)}tcp dport {spa} drop",
                ]
        for t in hook_targets:
            out.append(f"\t\t{dst(t)}tcp dport {pset(t.ports)} {syn} ct state new {priority}")
            out.append(f"\t\t{dst(t)}tcp dport {pset(t.ports)} drop")
        for t in hook_targets:
            if excluded:
                out.append(f"\t\t{dst(t)}tcp dport {pset(excluded)} return")
            out.append(f"\t\t{dst(t)}tcp dport {knock_range} {syn} ct state new {knock}")
        out.append("\t}")
    out.append("}")
    return "\n".join(out) + "\n"


def render_aws_sg(cfg: Config) -> str:
    """Security-group ingress permissions (``aws ec2 authorize-security-group-ingress
    --ip-permissions file://...``): the knock ranges, the protected ports and the SPA
    ports must *reach* the host; the host's own rules keep the protected ports closed."""
    perms: list[dict[str, object]] = []

    def perm(proto: str, lo: int, hi: int, what: str) -> dict[str, object]:
        return {
            "IpProtocol": proto,
            "FromPort": lo,
            "ToPort": hi,
            "IpRanges": [{"CidrIp": "0.0.0.0/0", "Description": what}],
            "Ipv6Ranges": [{"CidrIpv6": "::/0", "Description": what}],
        }

    for lo, hi in knock_ranges(cfg):
        perms.append(perm("tcp", lo, hi, "nfknock knock range (dropped by the host)"))
    for port in sorted(cfg.protected_ports):
        perms.append(perm("tcp", port, port, "nfknock protected port (opened by knocking)"))
    for f in cfg.door.forward:
        perms.append(perm("tcp", f.door_min, f.door_max, f"nfknock door {f.name} (by grant)"))
    for port in sorted(cfg.spa.ports):
        perms.append(perm("udp", port, port, "nfknock SPA port (dropped by the host)"))
        perms.append(perm("tcp", port, port, "nfknock SPA port, SYN form (dropped by the host)"))
    return json.dumps(perms, indent=1) + "\n"
