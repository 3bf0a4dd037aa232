"""Grant prefixes: a grant (and knock progress) for a client's network, not one address.

Mobile carriers move a subscriber between the addresses of a pool, and IPv6 clients
rotate privacy addresses inside their /64.  ``[door] grant_prefix_v4`` /
``grant_prefix_v6`` (and the same keys per user) let a grant cover the leading bits
of the address that earned it.  The representation, everywhere (grant table, claim
requests, stored and shared grant records):

* an *exact* grant (the defaults, /32 and /128) has prefix ``None`` and is keyed by
  the address itself -- exactly as without this feature;
* a *prefix* grant has an ``int`` prefix shorter than the address and is keyed by the
  address with every bit past the prefix cleared.  The masked address alone is
  ambiguous (``198.51.100.0`` as a host, or ``198.51.100.0/24``), so the length always
  travels with it.

Table keys are a packed source followed by a packed destination (4 + 4 or 16 + 16
bytes, see :func:`nfknock.grants.split_key`); only the source part is ever masked.
"""

from __future__ import annotations

from nfknock.events import addr_text

# Sane bounds per address size (bytes): no prefix wider than this is accepted (a /0
# would open for everyone); and from how wide on ``check`` warns that many strangers
# share a grant (a v4 /24 is one carrier pool block; a v6 /48 one site).
BOUNDS = {4: (8, 32), 16: (16, 128)}
WIDE = {4: 24, 16: 48}


def exact(prefix: int, size: int) -> int | None:
    """The configured ``prefix`` for an address of ``size`` bytes as a grant's prefix:
    None when it covers the whole address."""
    return None if prefix >= 8 * size else prefix


def mask_address(addr: bytes, prefix: int | None) -> bytes:
    """``addr`` with every bit past ``prefix`` cleared (None: unchanged)."""
    if prefix is None:
        return addr
    bits = 8 * len(addr)
    keep = ((1 << prefix) - 1) << (bits - prefix)
    return (int.from_bytes(addr, "big") & keep).to_bytes(len(addr), "big")


def mask_key(key: bytes, prefix: int | None) -> bytes:
    """A table key (source + destination) with its source masked to ``prefix``."""
    if prefix is None:
        return key
    half = len(key) // 2
    return mask_address(key[:half], prefix) + key[half:]


def is_masked(addr: bytes, prefix: int) -> bool:
    """Whether ``addr`` has no bit set past ``prefix`` (a well-formed prefix key)."""
    return mask_address(addr, prefix) == addr


def text(addr: bytes, prefix: int | None) -> str:
    """``198.51.100.0/24``, or the bare address for an exact grant."""
    return addr_text(addr) if prefix is None else f"{addr_text(addr)}/{prefix}"


def key_mask(size: int, prefix: int) -> int:
    """The integer mask of a table key of two ``size``-byte addresses that keeps the
    source's first ``prefix`` bits and the whole destination (for the packet paths:
    ``(int.from_bytes(key, "big") & mask).to_bytes(len(key), "big")``)."""
    bits = 8 * size
    return ((1 << prefix) - 1) << (2 * bits - prefix) | ((1 << bits) - 1)


def key_masks(v4: int, v6: int) -> dict[int, int]:
    """The knock engine's masks by key size (8, 32): IPv4 sources to ``v4`` bits,
    IPv6 to ``v6``; a family at its full length has none.  Empty when neither
    masks anything -- the engine then keeps its unmasked packet path."""
    masks = {}
    for size, prefix in ((4, v4), (16, v6)):
        if exact(prefix, size) is not None:
            masks[2 * size] = key_mask(size, prefix)
    return masks
