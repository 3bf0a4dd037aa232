"""Why an SPA packet was refused: one exception type, stable machine-readable codes.

The codes are a contract (fail2ban filters, metrics and ``nfknock spa inspect`` key
on them): add new ones, never reword or reuse one.  They are listed in the order of
the checks (issue 10 item 2), which is also how far a packet got: when several users
were tried, the refusal reported is the one of the user the packet got furthest with.

| code | meaning |
|---|---|
| ``spa_accepted`` | every check passed (not a refusal) |
| ``spa_too_short`` | payload under 140 bytes (fwknopd's ``MIN_SPA_DATA_SIZE``) |
| ``spa_too_long`` | payload over 1500 bytes (fwknopd's ``MAX_SPA_PACKET_LEN``) |
| ``spa_salted_prefix`` | payload starts with ``U2FsdGVkX1`` (a client always strips it) |
| ``spa_bad_base64`` | a character outside the base64 alphabet, or a non-canonical tag |
| ``spa_no_user_for_source`` | no fwknop user accepts SPA from this source |
| ``spa_no_hmac_match`` | no candidate user's HMAC key authenticates the packet |
| ``spa_bad_ciphertext`` | authenticated, but not an AES blob of whole blocks behind ``Salted__`` |
| ``spa_decrypt_failed`` | the plaintext does not start with 16 digits and ':' (key or mode) |
| ``spa_bad_digest`` | the inner digest is missing, of no known length, or wrong |
| ``spa_bad_fields`` | a plaintext field is missing or malformed |
| ``spa_replay`` | this exact payload was authenticated before |
| ``spa_replay_cache_full`` | the replay cache is full of live entries: fail closed |
| ``spa_user_disabled`` | the user is disabled |
| ``spa_too_old`` | timestamp more than ``[spa] max_age`` seconds in the past |
| ``spa_from_future`` | timestamp more than ``[spa] max_age`` seconds in the future |
| ``spa_username_mismatch`` | the user requires ``fwknop_username`` and the packet has another |
| ``spa_command_refused`` | a COMMAND message (nfknock never executes anything) |
| ``spa_nat_refused`` | a NAT / local-NAT message not served: no forward entry, a host name |
| ``spa_nat_target_refused`` | a NAT message for a target no forward entry of the user has |
| ``spa_nat_door_refused`` | a NAT door (``-A tcp/PORT``) outside its entry's range |
| ``spa_allow_ip_refused`` | the allow-IP is not the source and the user may not name another |
| ``spa_port_not_allowed`` | a requested proto/port is not one the user may open |
"""

from __future__ import annotations

ACCEPTED = "spa_accepted"
TOO_SHORT = "spa_too_short"
TOO_LONG = "spa_too_long"
SALTED_PREFIX = "spa_salted_prefix"
BAD_BASE64 = "spa_bad_base64"
NO_USER_FOR_SOURCE = "spa_no_user_for_source"
NO_HMAC_MATCH = "spa_no_hmac_match"
BAD_CIPHERTEXT = "spa_bad_ciphertext"
DECRYPT_FAILED = "spa_decrypt_failed"
BAD_DIGEST = "spa_bad_digest"
BAD_FIELDS = "spa_bad_fields"
REPLAY = "spa_replay"
REPLAY_CACHE_FULL = "spa_replay_cache_full"
USER_DISABLED = "spa_user_disabled"
TOO_OLD = "spa_too_old"
FROM_FUTURE = "spa_from_future"
USERNAME_MISMATCH = "spa_username_mismatch"
COMMAND_REFUSED = "spa_command_refused"
NAT_REFUSED = "spa_nat_refused"
NAT_TARGET_REFUSED = "spa_nat_target_refused"
NAT_DOOR_REFUSED = "spa_nat_door_refused"
ALLOW_IP_REFUSED = "spa_allow_ip_refused"
PORT_NOT_ALLOWED = "spa_port_not_allowed"

# Default prose per code, in check order (the index is the "how far" rank).
PROSE: dict[str, str] = {
    TOO_SHORT: "payload shorter than 140 bytes",
    TOO_LONG: "payload longer than 1500 bytes",
    SALTED_PREFIX: "payload starts with the base64 of 'Salted__'",
    BAD_BASE64: "payload is not base64 text",
    NO_USER_FOR_SOURCE: "no fwknop user accepts SPA from this source",
    NO_HMAC_MATCH: "no user's HMAC key authenticates the packet",
    BAD_CIPHERTEXT: "not an AES-256 ciphertext of whole blocks behind 'Salted__'",
    DECRYPT_FAILED: "decryption gave no 16-digit random value (wrong key or mode)",
    BAD_DIGEST: "the digest inside the packet is missing or wrong",
    BAD_FIELDS: "malformed fields in the decrypted packet",
    REPLAY: "this packet was seen before",
    REPLAY_CACHE_FULL: "the replay cache is full of live entries",
    USER_DISABLED: "the user is disabled",
    TOO_OLD: "the packet is too old",
    FROM_FUTURE: "the packet is from the future",
    USERNAME_MISMATCH: "the packet's username is not the one this user requires",
    COMMAND_REFUSED: "command messages are refused (nfknock executes nothing)",
    NAT_REFUSED: "NAT access messages are not served here",
    NAT_TARGET_REFUSED: "no forwarded door of this user leads to the requested target",
    NAT_DOOR_REFUSED: "the requested door port is not in the forward entry's range",
    ALLOW_IP_REFUSED: "the allow-IP differs from the source and this user may not name another",
    PORT_NOT_ALLOWED: "a requested port is not one this user may open",
    ACCEPTED: "accepted",
}
RANK: dict[str, int] = {code: i for i, code in enumerate(PROSE)}
CODES = frozenset(PROSE)


class SpaError(Exception):
    """An SPA packet refused by a check.  ``code`` is stable (one of :data:`CODES`);
    ``detail`` is prose for people (tests assert on the code, never the prose)."""

    def __init__(self, code: str, detail: str = "") -> None:
        if code not in PROSE or code == ACCEPTED:
            raise ValueError(f"unknown SPA refusal code {code!r}")
        self.code = code
        self.detail = detail or PROSE[code]
        super().__init__(f"{code}: {self.detail}")
