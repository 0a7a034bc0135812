"""Usage of the OpenAI-compatible API per UTC day, key and engine: the ledger's counts added to the
store on both backends (a failed or cancelled flush neither loses nor double-counts, processes
flushing at once add up), the report's rows, daily totals and CSV (formulas never run in a
spreadsheet), and ``gateway usage`` reading what a real gateway counted for two keys."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import asyncpg
import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.adapters import Usage
from gateway.config import QueueSettings
from gateway.jobs.model import Job
from gateway.jobs.queue import PortalUsageCount, QueueStoreError
from gateway.outcomes import JobError, JobState, Outcome
from gateway.stores import USAGE_FILE, Stores
from gateway.tasks import Category, Task, TextPrompt
from gateway.testing import silence
from gateway.usage.ledger import ApiUsageLedger, ApiUsageRow, ApiUsageStore, utc_day
from gateway.usage.report import CSV_COLUMNS, FORMULA_STARTS, UsageRow, api_usage, daily_totals, merged, portal_usage, portal_usage_rows, to_csv
from gateway.usage.sqlite import SQLiteApiUsageStore
from tests.test_openai_api import api_config

DAY1 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
DAY2 = DAY1 + 86400
SCRIPTS_KEY = "sk-gw-scripts-0123456789abcdefSECRET"
BOTS_KEY = "sk-gw-bots-0123456789abcdefSECRETBOT"


class Clock:
    def __init__(self, now: float = DAY1 + 3600) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- the store on each backend ----------------------------------------------------------------
@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> QueueSettings:
    if request.param == "sqlite":
        return QueueSettings(backend="sqlite", path=tmp_path / "queue.sqlite3")
    return QueueSettings(backend="postgres", dsn=request.getfixturevalue("postgres_dsn"), pool_size=4)


@contextlib.asynccontextmanager
async def opened(settings: QueueSettings, data_dir: Path) -> AsyncIterator[ApiUsageStore]:
    """The backend's usage store as a process opens it (PostgreSQL: through the queue's pool, migrated)."""
    stores = Stores.for_queue(settings, data_dir)
    if settings.backend == "postgres":
        await stores.queue.open()
    await stores.api_usage.open()
    try:
        yield stores.api_usage
    finally:
        await stores.api_usage.close()
        if settings.backend == "postgres":
            await stores.queue.close()


async def refuse_engine(settings: QueueSettings, data_dir: Path, engine: str, *, refuse: bool) -> None:
    """Make the database itself refuse rows of ``engine`` (a trigger), or stop refusing: a write that fails half-way."""
    if settings.backend == "sqlite":
        conn = sqlite3.connect(data_dir / USAGE_FILE, isolation_level=None)
        try:
            if refuse:
                conn.execute(
                    f"CREATE TRIGGER refuse BEFORE INSERT ON api_usage WHEN NEW.engine = '{engine}' BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
                )
            else:
                conn.execute("DROP TRIGGER refuse")
        finally:
            conn.close()
        return
    conn = await asyncpg.connect(settings.dsn)
    try:
        if refuse:
            await conn.execute("CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$ LANGUAGE plpgsql")
            await conn.execute(
                f"CREATE TRIGGER refuse BEFORE INSERT ON gateway_api_usage FOR EACH ROW WHEN (NEW.engine = '{engine}') EXECUTE FUNCTION refuse()"
            )
        else:
            await conn.execute("DROP TRIGGER refuse ON gateway_api_usage")
    finally:
        await conn.close()


@pytest.mark.anyio
async def test_flushes_add_the_counts_to_the_stored_rows(backend: QueueSettings, tmp_path: Path) -> None:
    clock = Clock()
    async with opened(backend, tmp_path) as store:
        ledger = ApiUsageLedger(store, clock=clock)
        ledger.record("scripts", "acme_text", error=False, usage=Usage(7, 3, 10, 0.25))
        ledger.record("scripts", "acme_text", error=True)
        ledger.record("bots", "acme_audio", error=False, audio_seconds=75.5)
        assert await store.rows("2026-01-01") == []  # nothing is written before a flush
        assert await ledger.flush() == 2
        assert ledger.pending() == []
        ledger.record("scripts", "acme_text", error=False, usage=Usage(prompt_tokens=5, completion_tokens=None, cost_usd=0.5))
        clock.now = DAY2 + 10  # past midnight UTC: a new day's row
        ledger.record("scripts", "acme_text", error=False, usage=Usage(1, 1, 2))
        assert await ledger.flush() == 2
        assert await ledger.flush() == 0
        assert await store.rows("2026-01-01") == [
            ApiUsageRow("2026-01-01", "bots", "acme_audio", 1, 0, 0, 0, 0.0, 75.5),
            ApiUsageRow("2026-01-01", "scripts", "acme_text", 3, 1, 12, 3, 0.75, 0.0),
            ApiUsageRow("2026-01-02", "scripts", "acme_text", 1, 0, 1, 1, 0.0, 0.0),
        ]
        assert [r.day for r in await store.rows("2026-01-02")] == ["2026-01-02"]
        ledger.record("scripts", "acme_text", error=False, usage=Usage(2, 2, 4))  # not flushed yet: ledger.rows adds it
        assert (await ledger.rows("2026-01-02"))[0].prompt_tokens == 3


@pytest.mark.anyio
async def test_a_write_refused_half_way_keeps_the_counts_and_the_retry_adds_them_once(backend: QueueSettings, tmp_path: Path) -> None:
    async with opened(backend, tmp_path) as store:
        ledger = ApiUsageLedger(store, clock=Clock())
        ledger.record("scripts", "acme_text", error=False, usage=Usage(7, 3))
        await ledger.flush()
        await refuse_engine(backend, tmp_path, "zz_refused", refuse=True)
        ledger.record("scripts", "acme_text", error=False, usage=Usage(7, 3))  # written first in the batch, then rolled back
        ledger.record("scripts", "zz_refused", error=True)
        with pytest.raises(QueueStoreError, match="refused by the test"):
            await ledger.flush()
        assert [(r.engine, r.requests) for r in await store.rows("2026-01-01")] == [("acme_text", 1)]  # all or nothing
        assert [(r.engine, r.requests) for r in ledger.pending()] == [("acme_text", 1), ("zz_refused", 1)]
        ledger.record("scripts", "acme_text", error=False, usage=Usage(1, 1))  # counted meanwhile: joins the kept counts
        await refuse_engine(backend, tmp_path, "zz_refused", refuse=False)
        assert await ledger.flush() == 2
        assert await store.rows("2026-01-01") == [
            ApiUsageRow("2026-01-01", "scripts", "acme_text", 3, 0, 15, 7, 0.0, 0.0),
            ApiUsageRow("2026-01-01", "scripts", "zz_refused", 1, 1, 0, 0, 0.0, 0.0),
        ]


@pytest.mark.anyio
async def test_ledgers_of_two_processes_flushing_at_once_add_up(backend: QueueSettings, tmp_path: Path) -> None:
    async with opened(backend, tmp_path) as first, opened(backend, tmp_path) as second:  # two connections, as two processes have
        ledgers = [ApiUsageLedger(first, clock=Clock()), ApiUsageLedger(second, clock=Clock())]
        for _ in range(5):
            for ledger in ledgers:
                for key in ("scripts", "bots"):
                    for engine in ("acme_text", "acme_image"):
                        ledger.record(key, engine, error=engine == "acme_image", usage=Usage(2, 1, cost_usd=0.125))
            await asyncio.gather(*(ledger.flush() for ledger in ledgers))
        rows = await first.rows("2026-01-01")
        assert [(r.api_key, r.engine, r.requests, r.errors, r.prompt_tokens, r.completion_tokens, r.cost_usd) for r in rows] == [
            ("bots", "acme_image", 10, 10, 20, 10, 1.25),
            ("bots", "acme_text", 10, 0, 20, 10, 1.25),
            ("scripts", "acme_image", 10, 10, 20, 10, 1.25),
            ("scripts", "acme_text", 10, 0, 20, 10, 1.25),
        ]


class SlowStore:
    """A store whose writes wait for the test: a flush can be cancelled while its write runs."""

    def __init__(self, store: ApiUsageStore, fail: bool = False) -> None:
        self.store, self.fail, self.where = store, fail, "slow"
        self.started, self.go = asyncio.Event(), asyncio.Event()

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def add(self, rows: Sequence[ApiUsageRow]) -> None:
        self.started.set()
        await self.go.wait()
        if self.fail:
            raise QueueStoreError("the database went away")
        await self.store.add(rows)

    async def rows(self, since_day: str) -> list[ApiUsageRow]:
        return await self.store.rows(since_day)


@pytest.mark.anyio
@pytest.mark.parametrize("fail", [False, True], ids=["write-commits", "write-fails"])
async def test_a_flush_cancelled_while_its_write_waits_in_a_thread_counts_once(tmp_path: Path, fail: bool) -> None:
    async with opened(QueueSettings(backend="sqlite", path=tmp_path / "q.sqlite3"), tmp_path) as store:
        assert isinstance(store, SQLiteApiUsageStore)
        ledger = ApiUsageLedger(store, clock=Clock())
        ledger.record("scripts", "acme_text", error=False, usage=Usage(7, 3))
        holder = sqlite3.connect(tmp_path / USAGE_FILE, isolation_level=None)  # another process writing
        try:
            holder.execute("BEGIN IMMEDIATE")
            if fail:
                holder.execute("CREATE TRIGGER refuse BEFORE INSERT ON api_usage BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")
            flush = asyncio.create_task(ledger.flush())
            for _ in range(1000):  # until the write is in its thread, waiting for the lock
                if store._lock.locked():
                    break
                await asyncio.sleep(0.001)
            flush.cancel()  # as the Supervisor stops the loop at shutdown; the thread cannot be stopped
            holder.execute("COMMIT")
        finally:
            holder.close()
        with pytest.raises(asyncio.CancelledError):
            await flush
        assert len(ledger.pending()) == (1 if fail else 0)  # kept only if the write did not commit
        if fail:
            await refuse_engine(QueueSettings(backend="sqlite"), tmp_path, "", refuse=False)
        await ledger.flush()
        assert [(r.requests, r.prompt_tokens) for r in await store.rows("2026-01-01")] == [(1, 7)]


@pytest.mark.anyio
async def test_the_flush_loop_keeps_counts_while_the_store_fails_and_close_writes_the_rest(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with opened(QueueSettings(backend="sqlite", path=tmp_path / "q.sqlite3"), tmp_path) as real:
        slow = SlowStore(real, fail=True)
        slow.go.set()
        ledger = ApiUsageLedger(slow, clock=Clock())
        ledger.record("bots", "acme_text", error=False, usage=Usage(1, 2))
        loop = asyncio.create_task(ledger.run(interval=0.01))
        try:
            for _ in range(500):  # bounded: 5 s at most
                if ledger.failures >= 2:
                    break
                await asyncio.sleep(0.01)
        finally:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        assert ledger.failures >= 2 and ledger.last_error == "the database went away"
        assert "API usage: cannot write to slow (the database went away); 1 row(s) kept in memory" in caplog.text
        slow.fail = False
        await ledger.close()
        assert ledger.failures == 0 and ledger.pending() == []
        assert [(r.api_key, r.requests, r.completion_tokens) for r in await real.rows("2026-01-01")] == [("bots", 1, 2)]


# -- the report ----------------------------------------------------------------------------------
def job(engine: str, portal: str, finished_at: float, result: dict | None) -> Job:
    task = Task(f"j{finished_at}", engine, Category.TEXT, TextPrompt("hi"), accepted_at=finished_at - 1, portal=portal)
    outcome = Outcome(result=result) if result is not None else Outcome(error=JobError("boom", 502))
    return Job(task, "http://p/cb", "http://p/err", state=JobState.DELIVERED if result else JobState.FAILED, outcome=outcome, finished_at=finished_at)


def test_portal_jobs_and_api_rows_become_one_report() -> None:
    """The queue's counts of portal jobs (as ``usage_totals`` answers them) and the API's rows, as the CLI and the
    dashboard show them; the counts are what the jobs add up to (the SQL itself: tests/test_queue_contract.py)."""
    counts = [
        PortalUsageCount("2026-01-01", "acme_text", "b.bitrix24.com", 2, 1, 7, 3, 0.5, 0.0),
        PortalUsageCount("2026-01-01", "acme_text", "a.bitrix24.com", 1, 0, 0, 0, 0.0, 0.0),
        PortalUsageCount("2026-01-02", "acme_call", "a.bitrix24.com", 1, 0, 0, 0, 0.0, 90.0),
    ]
    jobs = [
        job("acme_text", "b.bitrix24.com", DAY1 + 5, {"kind": "text", "text": "x", "usage": {"prompt_tokens": 7, "completion_tokens": 3, "cost_usd": 0.5}}),
        job("acme_text", "b.bitrix24.com", DAY1 + 6, None),
        job("acme_text", "a.bitrix24.com", DAY1 + 7, {"kind": "text", "text": "x", "usage": None}),
        job("acme_call", "a.bitrix24.com", DAY2 + 7, {"kind": "transcript", "text": "x", "duration": 90.0, "usage": None}),
    ]
    api = [ApiUsageRow("2026-01-01", "scripts", "acme_text", 4, 1, 21, 9, 0.0, 0.0), ApiUsageRow("2026-01-02", "-bots", "acme_audio", 1, 0, 0, 0, 0.0, 6.0)]
    assert portal_usage_rows(counts) == portal_usage(jobs)
    rows = merged(portal_usage_rows(counts), api_usage(api))
    assert rows == [
        UsageRow("2026-01-01", "api", "acme_text", "scripts", 4, 1, 21, 9, 0.0, 0.0),
        UsageRow("2026-01-01", "portal", "acme_text", "a.bitrix24.com", 1, 0, 0, 0, 0.0, 0.0),
        UsageRow("2026-01-01", "portal", "acme_text", "b.bitrix24.com", 2, 1, 7, 3, 0.5, 0.0),
        UsageRow("2026-01-02", "api", "acme_audio", "-bots", 1, 0, 0, 0, 0.0, 6.0),
        UsageRow("2026-01-02", "portal", "acme_call", "a.bitrix24.com", 1, 0, 0, 0, 0.0, 90.0),
    ]
    assert {k: rows[2].to_json()[k] for k in ("day", "engine", "jobs", "results", "prompt_tokens")} == {
        "day": "2026-01-01",
        "engine": "acme_text",
        "jobs": 2,
        "results": 1,
        "prompt_tokens": 7,
    }  # the keys `gateway usage --json` always had
    assert "jobs" not in rows[0].to_json()
    assert [(t.day, t.requests, t.errors, t.prompt_tokens, t.audio_seconds) for t in daily_totals(rows)] == [
        ("2026-01-01", 7, 2, 28, 0.0),
        ("2026-01-02", 2, 0, 0, 96.0),
    ]
    lines = to_csv(rows).splitlines()
    assert lines[0] == ",".join(CSV_COLUMNS)
    assert lines[4] == "2026-01-02,api,acme_audio,'-bots,1,0,0,0,0.0,6.0"  # a key named like a formula stays text


def unescape(cell: str) -> str:
    return cell[1:] if cell.startswith("'") else cell


texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=20) | st.sampled_from(["=1+1", "+SUM(A1)", "-2", "@cmd", "\tx", "\r=x", "'=x", 'a,b"c\nd'])
usage_rows = st.builds(
    UsageRow,
    day=st.dates().map(lambda d: d.isoformat()),
    surface=st.sampled_from(["portal", "api"]),
    engine=texts,
    who=texts,
    requests=st.integers(0, 10**12),
    errors=st.integers(0, 10**12),
    prompt_tokens=st.integers(0, 10**15),
    completion_tokens=st.integers(0, 10**15),
    cost_usd=st.floats(0, 1e9, allow_nan=False),
    audio_seconds=st.floats(0, 1e9, allow_nan=False),
)


@given(st.lists(usage_rows, max_size=8))
@settings(max_examples=200, deadline=None)
def test_csv_gives_back_every_value_and_no_cell_starts_like_a_formula(rows: list[UsageRow]) -> None:
    read = list(csv.reader(io.StringIO(to_csv(rows), newline="")))
    assert read[0] == list(CSV_COLUMNS)
    assert len(read) == len(rows) + 1
    for row, cells in zip(rows, read[1:], strict=True):
        assert not any(cell.startswith(FORMULA_STARTS) for cell in cells), cells
        back = [unescape(cell) for cell in cells]
        assert back[:4] == [row.day, row.surface, row.engine, row.who]
        assert [int(c) for c in back[4:8]] == [row.requests, row.errors, row.prompt_tokens, row.completion_tokens]
        assert (float(back[8]), float(back[9])) == (row.cost_usd, row.audio_seconds)


@given(st.lists(usage_rows, max_size=12), st.randoms())
@settings(max_examples=100, deadline=None)
def test_merging_in_any_order_gives_the_same_sorted_rows_and_totals_keep_every_request(rows: list[UsageRow], random: object) -> None:
    shuffled = list(rows)
    random.shuffle(shuffled)  # type: ignore[attr-defined]
    once = merged(rows)
    assert merged(shuffled[:3], shuffled[3:]) == once
    assert [(r.day, r.surface, r.engine, r.who) for r in once] == sorted({(r.day, r.surface, r.engine, r.who) for r in rows})
    totals = daily_totals(once)
    assert [t.day for t in totals] == sorted({r.day for r in rows})
    assert sum(t.requests for t in totals) == sum(r.requests for r in rows)
    assert sum(t.prompt_tokens for t in totals) == sum(r.prompt_tokens for r in rows)


def test_utc_day_is_the_day_in_utc() -> None:
    assert (utc_day(DAY1 - 1), utc_day(DAY1), utc_day(DAY2 - 0.001)) == ("2025-12-31", "2026-01-01", "2026-01-01")


# -- end to end ------------------------------------------------------------------------------------
def client(gw, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=30)


@pytest.mark.e2e
def test_gateway_usage_shows_what_each_api_key_used(gateway: Callable[..., object], upstream, portal) -> None:
    config = api_config(upstream.url)
    config["api_keys"] = [
        {"name": "scripts", "secret": SCRIPTS_KEY, "engines": ["*"]},
        {"name": "bots", "secret": BOTS_KEY, "engines": ["acme_text"]},
    ]
    gw = gateway(config)
    scripts, bots = client(gw, SCRIPTS_KEY), client(gw, BOTS_KEY)
    for text in ("one", "two"):
        scripts.chat.completions.create(model="acme_text", messages=[{"role": "user", "content": text}])
    chunks = list(
        scripts.chat.completions.create(
            model="acme_text", messages=[{"role": "user", "content": "stream these words"}], stream=True, stream_options={"include_usage": True}
        )
    )
    streamed = chunks[-1].usage
    upstream.script("500", "500", "500")  # every try of the route fails: a 503 for the client, an error in the ledger
    with pytest.raises(openai.APIStatusError) as failed:
        scripts.chat.completions.create(model="acme_text", messages=[{"role": "user", "content": "fail"}])
    assert failed.value.status_code == 503
    with pytest.raises(openai.BadRequestError):  # refused after the engine is known: counted as an error
        scripts.images.generate(model="acme_image", prompt="a cat", size="256x256")
    scripts.audio.transcriptions.create(model="acme_audio", file=("m.wav", silence(1.0)))  # the stub says 75.5 s
    bots.chat.completions.create(model="acme_text", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):  # an engine the key may not use: not counted
        bots.images.generate(model="acme_image", prompt="a cat")
    assert httpx.get(gw.url + "/v1/models", headers={"Authorization": "Bearer nope-not-a-key"}).status_code == 401  # no key: not counted

    job_hash, body = portal.new_request(prompt="from the portal")
    assert portal.send(gw.completions_url(), body).status_code == 202
    assert portal.wait(job_hash).delivered[0].kind == "success"
    gw.wait_final(1)
    gw.stop()  # SIGTERM: the last counts are written at stop

    rows = gw.cli_json("usage", "--surface", "api")
    assert [(r["who"], r["engine"], r["requests"], r["errors"], r["prompt_tokens"], r["completion_tokens"], r["audio_seconds"]) for r in rows] == [
        ("scripts", "acme_audio", 1, 0, 0, 0, 75.5),  # by day, surface, engine, then who
        ("scripts", "acme_image", 1, 1, 0, 0, 0.0),
        ("bots", "acme_text", 1, 0, 7, 3, 0.0),
        ("scripts", "acme_text", 4, 1, 7 + 7 + streamed.prompt_tokens, 3 + 3 + streamed.completion_tokens, 0.0),
    ]
    assert streamed.prompt_tokens == 7 and streamed.completion_tokens > 0  # the stream's last chunk carried its usage
    assert {r["surface"] for r in rows} == {"api"}
    both = gw.cli_json("usage")
    assert [(r["surface"], r["who"]) for r in both if r["surface"] == "portal"] == [("portal", "127.0.0.1")]
    [portal_row] = [r for r in both if r["surface"] == "portal"]
    assert (portal_row["jobs"], portal_row["results"], portal_row["prompt_tokens"]) == (1, 1, 7)
    table = gw.cli("usage", "--csv").stdout
    assert table.splitlines()[0] == ",".join(CSV_COLUMNS) and len(table.splitlines()) == 6
    text = gw.cli("usage").stdout
    assert "requests      4  errors      1" in text and "key scripts" in text and "portal 127.0.0.1" in text
    refused = gw.cli("usage", "--tenant", "x", "--surface", "api", check=False)
    assert refused.returncode == 2 and "leave out --surface api" in refused.stderr
    logs = gw.logs()
    assert SCRIPTS_KEY not in logs and BOTS_KEY not in logs and SCRIPTS_KEY not in json.dumps(both)
