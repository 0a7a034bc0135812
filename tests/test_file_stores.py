"""The hosted-file stores, one contract for both: a folder of data_dir (SQLite default) and the
shared PostgreSQL database (any node serves what another stored)."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.config import QueueSettings
from gateway.files import FileStore, LocalFileStore
from gateway.stores import Stores

PNG = b"\x89PNG\r\n\x1a\n"
pytestmark = pytest.mark.anyio


@pytest.fixture(params=["local", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[FileStore, Callable[[str, float], Any]]]:
    """A file store and a way to make one of its files look ``seconds`` old."""
    if request.param == "local":
        local = LocalFileStore(tmp_path / "files")

        async def age_file(name: str, seconds: float) -> None:
            past = time.time() - seconds
            os.utime(tmp_path / "files" / name, (past, past))

        yield local, age_file
        return
    dsn = request.getfixturevalue("postgres_dsn")
    stores = Stores.for_queue(QueueSettings(backend="postgres", dsn=dsn), tmp_path)
    await stores.queue.open()  # opens the pool the file store shares, and migrates

    async def age_row(name: str, seconds: float) -> None:
        db = stores.files.db  # type: ignore[attr-defined]
        await db.run(lambda conn: conn.execute("UPDATE gateway_files SET created_at = $1 WHERE name = $2", time.time() - seconds, name))

    yield stores.files, age_row
    await stores.queue.close()


async def test_a_stored_file_reads_back_with_its_type(store):
    files, _ = store
    name = await files.put(PNG + b"picture", "png")
    assert name.endswith(".png") and len(name) == 36
    stored = await files.read(name)
    assert stored is not None and stored.content_type == "image/png"
    data = stored.data if stored.data is not None else stored.path.read_bytes()
    assert data == PNG + b"picture"


@pytest.mark.parametrize("name", ["../files/x.png", "a" * 32 + ".gif", "", "a" * 31 + ".png", "a" * 32 + ".png/..", "%2e%2e.png"])
async def test_names_it_never_gave_out_are_not_files(store, name):
    files, _ = store
    await files.put(PNG + b"x", "png")
    assert await files.read(name) is None


async def test_retention_deletes_only_files_older_than_the_cutoff(store):
    files, age = store
    old = await files.put(PNG + b"old", "png")
    new = await files.put(PNG + b"new", "png")
    await age(old, 31 * 86400)
    assert await files.delete_older_than(time.time() - 30 * 86400) == 1
    assert await files.read(old) is None and await files.read(new) is not None
    assert await files.delete_older_than(time.time() - 30 * 86400) == 0
