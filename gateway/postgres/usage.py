"""API usage in the shared database (table ``gateway_api_usage``, migration 4): every node adds its
counts to the same rows, so the totals are the cluster's.

A flush is one transaction; its rows arrive sorted by (day, key, engine) (the ledger sorts them),
so two nodes flushing the same rows lock them in the same order and never deadlock.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.postgres.database import Database
from gateway.usage.ledger import COUNTERS, ApiUsageRow

UPSERT = (
    f"INSERT INTO gateway_api_usage AS u (day, api_key, engine, {', '.join(COUNTERS)})"
    f" VALUES ({', '.join(f'${i}' for i in range(1, 4 + len(COUNTERS)))})"
    f" ON CONFLICT (day, api_key, engine) DO UPDATE SET {', '.join(f'{c} = u.{c} + excluded.{c}' for c in COUNTERS)}"
)
SELECT = f"SELECT day, api_key, engine, {', '.join(COUNTERS)} FROM gateway_api_usage WHERE day >= $1 ORDER BY day, api_key, engine"


class PostgresApiUsageStore:
    """Shares the process's pool with the job queue, which opens and closes it (and migrates)."""

    def __init__(self, database: Database) -> None:
        self.db = database
        self.where = "the shared PostgreSQL database (table gateway_api_usage)"

    async def open(self) -> None:
        """Nothing of its own to open: the queue opened the pool."""

    async def close(self) -> None:
        """The queue closes the pool."""

    async def add(self, rows: Sequence[ApiUsageRow]) -> None:
        values = [(*row.key, *row.counts()) for row in rows]
        if not values:
            return
        async with self.db.connection() as conn, conn.transaction():
            await conn.executemany(UPSERT, values)

    async def rows(self, since_day: str) -> list[ApiUsageRow]:
        found = await self.db.run(lambda conn: conn.fetch(SELECT, since_day))
        return [ApiUsageRow(*row) for row in found]
