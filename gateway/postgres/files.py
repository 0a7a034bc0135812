"""Hosted images in the shared database (``bytea``), so that any node serves a file another stored.

Sizes are bounded before a file gets here (``files.max_bytes``, 20 MB by default, checked by
:class:`~gateway.files.ImageHost`), which keeps a row well inside what ``bytea`` and one
round trip handle; retention deletes rows as the local store deletes files.
"""

from __future__ import annotations

import time

from gateway.files import CONTENT_TYPES, StoredFile, file_id, new_file_name
from gateway.postgres.database import Database

DELETE_BATCH = 500


class PostgresFileStore:
    def __init__(self, database: Database) -> None:
        self.db = database

    async def put(self, data: bytes, extension: str) -> str:
        name = new_file_name(extension)
        await self.db.run(
            lambda conn: conn.execute(
                "INSERT INTO gateway_files (name, content_type, data, created_at) VALUES ($1, $2, $3, $4)", name, CONTENT_TYPES[extension], data, time.time()
            )
        )
        return name

    async def read(self, name: str) -> StoredFile | None:
        if file_id(name) is None:
            return None  # not a name this store gives out: no query for junk
        row = await self.db.run(lambda conn: conn.fetchrow("SELECT content_type, data FROM gateway_files WHERE name = $1", name))
        return StoredFile(row["content_type"], data=bytes(row["data"])) if row is not None else None

    async def delete(self, names: list[str]) -> int:
        wanted = [name for name in names if file_id(name) is not None]
        if not wanted:
            return 0
        status = await self.db.run(lambda conn: conn.execute("DELETE FROM gateway_files WHERE name = ANY($1::text[])", wanted))
        return int(status.split()[-1])

    async def delete_older_than(self, cutoff: float) -> int:
        """In batches, each its own statement: a large backlog never holds one long transaction."""
        deleted = 0
        while True:
            status = await self.db.run(
                lambda conn: conn.execute(
                    "DELETE FROM gateway_files WHERE name IN (SELECT name FROM gateway_files WHERE created_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
                    cutoff,
                    DELETE_BATCH,
                )
            )
            count = int(status.split()[-1])
            deleted += count
            if count < DELETE_BATCH:
                return deleted
