"""Generated engine tokens in the shared database: every node serves the same completions URLs.

Read once at start (:meth:`Runtime.prepare`) and by CLI commands, before any event loop or pool
exists, so this store has a synchronous face (:func:`~gateway.postgres.database.run_on_database`).
The schema is migrated first: a fresh database gets its tables from whichever command runs first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.config import QueueSettings
from gateway.engines import new_engine_token
from gateway.postgres.database import run_on_database


class PostgresTokenStore:
    def __init__(self, settings: QueueSettings) -> None:
        self.settings = settings
        self.where = "the shared PostgreSQL database (table gateway_engine_tokens)"

    def load(self, codes: Sequence[str]) -> dict[str, str]:
        async def work(conn: Any) -> dict[str, str]:
            # Every node may generate at once: the first insert wins, all read the winner.
            await conn.executemany(
                "INSERT INTO gateway_engine_tokens (code, token) VALUES ($1, $2) ON CONFLICT (code) DO NOTHING", [(code, new_engine_token()) for code in codes]
            )
            rows = await conn.fetch("SELECT code, token FROM gateway_engine_tokens WHERE code = ANY($1::text[])", list(codes))
            return {row["code"]: row["token"] for row in rows}

        return run_on_database(self.settings, work, "reading the engine tokens")
