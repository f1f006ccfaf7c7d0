"""What must never be committed: private key blocks. Pure.

The daemon commits what Agents print (output.log) and what it writes about
Runs; an Agent that prints a key, or a record that was swapped for one,
would put the key into the history, where it stays. gitops leaves such a
file out of the commit and `taskrun doctor` reports a tracked one.

A private key block is the armour line PEM, OpenSSH, PKCS#8 and OpenPGP
write: `-----BEGIN <anything> PRIVATE KEY-----` (RSA, EC, DSA, OPENSSH,
ENCRYPTED, none) and `-----BEGIN PGP PRIVATE KEY BLOCK-----`. PuTTY's
`PuTTY-User-Key-File-<n>:` files count too.
"""

from __future__ import annotations

import re

#: One regular expression for every kind above; `git grep -E` understands it too (doctor.py).
PRIVATE_KEY_PATTERN = r"-----BEGIN ([A-Z0-9]+ )*PRIVATE KEY( BLOCK)?-----|PuTTY-User-Key-File-[0-9]+:"
_PRIVATE_KEY = re.compile(PRIVATE_KEY_PATTERN.encode())
#: Cheap first looks, so the regular expression runs only on the rare file that has one.
_HINTS = (b"PRIVATE KEY", b"PuTTY-User-Key-File-")


def holds_private_key(data: bytes) -> bool:
    """True when `data` holds a private key block (see the module doc)."""
    if not any(hint in data for hint in _HINTS):
        return False
    return _PRIVATE_KEY.search(data) is not None
