"""The queue's own cost per job, without HTTP: statements, commits, WAL and CPU on each backend.

Each job goes through the happy path a worker takes: accept (stored already leased), the stored
outcome with its provider attempt, the final state with its callback attempt. PostgreSQL runs in
a throw-away cluster started here (as the tests do); SQLite in a temporary folder.

    make bench-queue        # or: .venv/bin/python bench/queue_cost.py [--jobs 3000] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

from gateway.config import QueueSettings
from gateway.jobs.model import Job, new_job_id
from gateway.jobs.queue import JobQueue
from gateway.outcomes import Attempt, AttemptKind, AttemptOutcome, DeliveryOutcome, JobState, Outcome
from gateway.stores import job_queue
from gateway.tasks import Category, Task, TextPrompt
from gateway.testing.postgres import PostgresServer

PROMPT = "Напиши короткое приветствие для клиентов нашей компании. " * 8  # ~0.8 KB of UTF-8
RESULT = {"kind": "text", "text": "Добрый день! " * 60, "usage": {"prompt_tokens": 120, "completion_tokens": 180}}
CALLBACK = "https://acme.bitrix24.com/rest/ai/callback?hash=" + "a" * 32


def make_job() -> Job:
    now = time.time()
    task = Task(job_id=new_job_id(), engine="e", category=Category.TEXT, prompt=TextPrompt(PROMPT), accepted_at=now, deadline=now + 600)
    return Job(task, CALLBACK, CALLBACK.replace("callback", "error"))


async def run_jobs(queue: JobQueue, first: int, count: int, concurrency: int) -> None:
    outcome = Outcome(result=RESULT)
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            job = make_job()
            await queue.enqueue(job, f"k{i}", lease_owner="w", lease_seconds=30)
            now = time.time()
            await queue.store_outcome(job.id, "w", outcome, [Attempt(AttemptKind.PROVIDER, "up/m", now, 0.5, AttemptOutcome.OK, "")])
            done = Attempt(AttemptKind.CALLBACK, "acme.bitrix24.com", now, 0.05, DeliveryOutcome.DELIVERED, "portal answered data:true")
            await queue.finish(job.id, "w", JobState.DELIVERED, "portal answered data:true", [done])

    await asyncio.gather(*[one(i) for i in range(first, first + count)])


async def measure(queue: JobQueue, jobs: int, concurrency: int, probe: Any = None) -> dict[str, float]:
    await run_jobs(queue, 0, 50, concurrency)  # warm: connections, prepared statements
    before = await probe() if probe else {}
    started, cpu = time.perf_counter(), time.process_time()
    await run_jobs(queue, 50, jobs, concurrency)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    figures = {"jobs/s": jobs / elapsed, "cpu ms/job": cpu / jobs * 1000}
    if probe:
        await asyncio.sleep(1.5)  # backends report their commits to the statistics within a second
        after = await probe()
        figures |= {key: (after[key] - before[key]) / jobs for key in after if key != "size"}
        figures["KiB kept/job"] = after["size"] / (jobs + 50) / 1024
    return figures


async def postgres_figures(jobs: int, concurrency: int) -> dict[str, float]:
    with PostgresServer() as server:
        dsn = server.create_database("queue_cost")
        queue = job_queue(QueueSettings(backend="postgres", dsn=dsn, pool_size=concurrency))
        await queue.open()
        watcher = await asyncpg.connect(dsn)

        async def probe() -> dict[str, float]:
            row = await watcher.fetchrow(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8 / 1024 AS wal,"
                " (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database())::float8 AS commits,"
                " (pg_total_relation_size('gateway_jobs') + pg_total_relation_size('gateway_attempts'))::float8 AS size"
            )
            return {"WAL KiB/job": row["wal"], "commits/job": row["commits"], "size": row["size"]}

        try:
            return await measure(queue, jobs, concurrency, probe)
        finally:
            await watcher.close()
            await queue.close()


async def sqlite_figures(jobs: int, concurrency: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        queue = job_queue(QueueSettings(path=Path(folder) / "q.sqlite3"))
        await queue.open()
        try:
            return await measure(queue, jobs, concurrency)
        finally:
            await queue.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    rows = {"SQLite": asyncio.run(sqlite_figures(args.jobs, args.concurrency)), "PostgreSQL": asyncio.run(postgres_figures(args.jobs, args.concurrency))}
    columns = ["jobs/s", "cpu ms/job", "commits/job", "WAL KiB/job", "KiB kept/job"]
    print(f"queue cost per job: {args.jobs} jobs, {args.concurrency} at a time (accept + outcome + final state)")
    print(f"| backend | {' | '.join(columns)} |\n|---|{'---|' * len(columns)}")
    for name, figures in rows.items():
        print(f"| {name} | {' | '.join(f'{figures[c]:.2f}' if c in figures else '-' for c in columns)} |")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")


if __name__ == "__main__":
    main()
