"""Single Packet Authorization in fwknop's wire format (issue 10), sans-IO.

Modules, each one concept:

* ``reasons`` -- the refusal codes (a contract) and the one exception type;
* ``packet`` -- an IP packet from the priority queue -> the SPA payload and addresses;
* ``wire`` -- shape checks and the split of the payload into ciphertext and tag;
* ``crypto`` -- AES-256 key derivation, modes and padding as libfko does them, HMAC;
* ``message`` -- the decrypted plaintext's fields, parsed and built;
* ``keys`` -- a user's fwknop keys from the users file;
* ``verify`` -- the checks in order: a payload in, a ``SpaResult`` out;
* ``replay`` -- the bounded, time-keyed replay cache;
* ``encode`` -- fwknop-format packets (our client and the tests);
* ``admin`` -- ``nfknock spa inspect`` and ``nfknock user add --spa``.

``encode`` and what it imports need only the standard library and
``cryptography``: the client imports them.  Nothing here reads a clock or logs.
"""
