"""Admin sessions: a signed cookie (HMAC-SHA256), and CSRF tokens derived from it.

The cookie names the user, a random session id, its expiry and a fingerprint of the user's
password hash; it is checked in constant time and refused once expired, once the password changed,
or after logout in this process. No server-side store is needed, so every process and node that
shares the key accepts it. A CSRF token is an HMAC of the session id: forms carry it, the server
recomputes it, and a page on another site cannot know it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.config import AdminSettings

KEY_FILE = "admin-session.key"
MAX_COOKIE_CHARS = 1024
MAX_REVOKED = 10000


@dataclass(frozen=True)
class Session:
    user: str
    id: str
    expires: float


def session_key(settings: AdminSettings, data_dir: Path) -> bytes:
    """The signing key: from ``admin.session_secret``, else a random key in ``data_dir`` that every
    process of this machine reads (created once, atomically: the first process to link it wins)."""
    if settings.session_secret:
        return hashlib.sha256(b"gateway-admin-session|" + settings.session_secret.encode()).digest()
    path = data_dir / KEY_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        temporary = data_dir / f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass
        finally:
            temporary.unlink()
    return bytes.fromhex(path.read_text().strip())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SessionSigner:
    """Issues and reads session cookies; derives CSRF tokens."""

    def __init__(self, key: bytes, hours: float, fingerprint: Callable[[str], str], clock: Callable[[], float] = time.time) -> None:
        self._key, self.lifetime, self._fingerprint, self._clock = key, hours * 3600, fingerprint, clock
        self._revoked: dict[str, float] = {}

    def _sign(self, purpose: str, data: bytes) -> bytes:
        return hmac.new(self._key, purpose.encode() + b"|" + data, hashlib.sha256).digest()

    def issue(self, user: str) -> tuple[str, Session]:
        session = Session(user, secrets.token_urlsafe(16), self._clock() + self.lifetime)
        payload = "|".join((user, session.id, str(int(session.expires)), self._fingerprint(user))).encode()
        return f"{_b64(payload)}.{_b64(self._sign('session', payload))}", session

    def _verified(self, purpose: str, value: str | None) -> bytes | None:
        """The data of a ``data.mac`` cookie signed for ``purpose``; None when absent, malformed or forged."""
        if not value or len(value) > MAX_COOKIE_CHARS or value.count(".") != 1:
            return None
        encoded, signature = value.split(".")
        try:
            data, mac = _unb64(encoded), _unb64(signature)
        except (binascii.Error, ValueError):
            return None
        return data if hmac.compare_digest(mac, self._sign(purpose, data)) else None

    def read(self, cookie: str | None) -> Session | None:
        """The session a cookie proves, or None (absent, forged, expired, logged out, password changed)."""
        payload = self._verified("session", cookie)
        if payload is None:
            return None
        fields = payload.decode("utf-8", "replace").split("|")
        if len(fields) != 4 or not fields[2].isdigit():
            return None
        user, session_id, expires, fingerprint = fields[0], fields[1], float(fields[2]), fields[3]
        if expires <= self._clock() or session_id in self._revoked or not hmac.compare_digest(fingerprint, self._fingerprint(user)):
            return None
        return Session(user, session_id, expires)

    def revoke(self, session: Session) -> None:
        """Logout: this process refuses the cookie from now on (other processes: until it expires; the browser drops it at once)."""
        now = self._clock()
        if len(self._revoked) >= MAX_REVOKED:
            self._revoked = {sid: until for sid, until in self._revoked.items() if until > now}
        self._revoked[session.id] = session.expires

    def csrf_token(self, scope: str) -> str:
        """The token forms carry: for a session, its id; before login, the login cookie's nonce."""
        return _b64(self._sign("csrf", scope.encode()))

    def check_csrf(self, scope: str, token: str | None) -> bool:
        if not token or len(token) > 100:
            return False
        return hmac.compare_digest(token.encode("utf-8", "surrogateescape"), self.csrf_token(scope).encode())

    def seal(self, text: str) -> str:
        """A short message signed for a cookie (a flash message after a redirect)."""
        data = text.encode()[:400]
        return f"{_b64(data)}.{_b64(self._sign('flash', data))}"

    def unseal(self, value: str | None) -> str | None:
        data = self._verified("flash", value)
        return data.decode("utf-8", "replace") if data is not None else None
