"""Admin passwords: scrypt hashes (the standard library's), checked in constant time.

A configured password may be the hash ``gateway admin hash-password`` prints, or the password itself
(from an environment variable); then it is hashed when the dashboard starts and only the hash is kept.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Iterable

from gateway.config import AdminUser

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
MAX_N, MAX_R, MAX_P = 2**20, 32, 16
"""Bounds on a hash's cost parameters: a hand-edited hash must not make one login take minutes."""
MAX_PASSWORD_BYTES = 1024


class PasswordHashError(ValueError):
    """A stored hash that is not ``scrypt$N$r$p$salt$hash`` with sane parameters."""


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, length: int = 32) -> bytes:
    secret = password.encode("utf-8", "surrogatepass")[:MAX_PASSWORD_BYTES]
    return hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, dklen=length, maxmem=256 * n * r + 1024 * 1024)


def hash_password(password: str, *, n: int = SCRYPT_N) -> str:
    salt = os.urandom(16)
    digest = _scrypt(password, salt, n, SCRYPT_R, SCRYPT_P)
    return "$".join(("scrypt", str(n), str(SCRYPT_R), str(SCRYPT_P), base64.b64encode(salt).decode(), base64.b64encode(digest).decode()))


def _parse(stored: str) -> tuple[bytes, int, int, int, bytes]:
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise PasswordHashError("not an scrypt hash: expected scrypt$N$r$p$salt$hash")
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, digest = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5], validate=True)
    except ValueError:
        raise PasswordHashError("the hash's numbers or base64 parts cannot be read") from None
    if not (2 <= n <= MAX_N and n & (n - 1) == 0 and 1 <= r <= MAX_R and 1 <= p <= MAX_P and len(salt) >= 8 and len(digest) >= 16):
        raise PasswordHashError(f"the hash's parameters are out of bounds (N a power of 2 up to {MAX_N}, r up to {MAX_R}, p up to {MAX_P})")
    return salt, n, r, p, digest


def verify_password(password: str, stored: str) -> bool:
    salt, n, r, p, digest = _parse(stored)
    return hmac.compare_digest(_scrypt(password, salt, n, r, p, len(digest)), digest)


class PasswordBook:
    """The configured users with hashed passwords. An unknown name costs the same scrypt as a known one,
    so the time of an answer does not tell which names exist.

    ``fingerprint_key`` (the session key) makes :meth:`fingerprint` the same in every process and after a
    restart, although a plain password is hashed with a new salt each time: it is an HMAC of the
    password as configured, so it changes exactly when the configuration does."""

    def __init__(self, users: Iterable[AdminUser], fingerprint_key: bytes) -> None:
        self._hashes: dict[str, str] = {}
        self._fingerprints: dict[str, str] = {}
        for user in users:
            stored = user.password if user.password.startswith("scrypt$") else hash_password(user.password)
            _parse(stored)  # a malformed hash fails at start, not at the first login
            self._hashes[user.name] = stored
            configured = user.password.encode("utf-8", "surrogatepass")
            self._fingerprints[user.name] = hmac.new(fingerprint_key, b"password|" + configured, hashlib.sha256).hexdigest()[:24]
        self._decoy = hash_password(os.urandom(16).hex())

    def names(self) -> list[str]:
        return list(self._hashes)

    def check(self, name: str, password: str) -> bool:
        """Blocking (scrypt takes tens of milliseconds): call it off the event loop."""
        stored = self._hashes.get(name)
        matched = verify_password(password, stored or self._decoy)
        return stored is not None and matched

    def fingerprint(self, name: str) -> str:
        """Sessions carry it: a changed password ends them. Not derived from the password alone (the cookie
        is readable by its holder), so it gives nothing to guess the password with."""
        return self._fingerprints.get(name, "")
