"""Failed logins, counted per client address and per user name over a sliding window.

After ``per_client`` failures from one address the next attempts are refused for the rest of the
window, before any password is checked. Per user name the limit slows instead of locking: past
``per_user`` failures from anywhere, one attempt per ``user_spacing`` seconds is let through — a
guesser spread over many addresses gets a trickle, and the real user is never locked out for
longer than a few seconds. An attempt counts as a failure when it starts (so parallel guesses cannot
all slip under the limit) and is taken back when its password matches. Counted in this process;
the table is bounded.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

MAX_KEYS = 10000


class LoginThrottle:
    def __init__(
        self,
        *,
        per_client: int = 5,
        per_user: int = 20,
        window: float = 300.0,
        user_spacing: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_client, self.per_user, self.window, self.user_spacing, self._clock = per_client, per_user, window, user_spacing, clock
        self._failures: dict[str, collections.deque[float]] = {}

    def _recent(self, key: str, now: float) -> collections.deque[float]:
        times = self._failures.get(key)
        if times is None:
            return collections.deque()
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]
        return times

    def retry_after(self, client: str, user: str) -> float:
        """Seconds until this client may try again for this user; 0: now."""
        now = self._clock()
        wait = 0.0
        by_client = self._recent(f"client:{client}", now)
        if len(by_client) >= self.per_client:
            wait = by_client[len(by_client) - self.per_client] + self.window - now
        by_user = self._recent(f"user:{user}", now)
        if len(by_user) >= self.per_user:
            wait = max(wait, by_user[-1] + self.user_spacing - now)
        return max(0.0, wait)

    def failed(self, client: str, user: str) -> None:
        now = self._clock()
        if len(self._failures) >= MAX_KEYS:
            for key in list(self._failures):
                self._recent(key, now)
            if len(self._failures) >= MAX_KEYS:  # a flood of addresses: forget the oldest half
                for key in list(self._failures)[: MAX_KEYS // 2]:
                    del self._failures[key]
        for key in (f"client:{client}", f"user:{user}"):
            self._failures.setdefault(key, collections.deque()).append(now)

    def succeeded(self, client: str, user: str) -> None:
        """The password matched: the client starts afresh, and the attempt no longer counts against the user."""
        self._failures.pop(f"client:{client}", None)
        times = self._failures.get(f"user:{user}")
        if times:
            times.pop()
            if not times:
                del self._failures[f"user:{user}"]
