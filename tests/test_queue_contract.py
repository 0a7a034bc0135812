"""The queue contract (gateway/jobs/queue.py), the same tests on every backend: SQLite and PostgreSQL.

Each test runs as ``[sqlite]`` and ``[postgres]`` through the ``queue``/``queue_store`` fixtures
(tests/conftest.py); the PostgreSQL half uses a fresh database of the run's throw-away cluster.
The concurrency tests open several queue objects on one store, as several processes or nodes would.
What only one backend does (SQLite's group commit, its file locks) is tested in that backend's file.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest

from gateway.jobs.model import Attempt, Job, JobError, JobState, Outcome, new_job_id
from gateway.jobs.queue import JobFilter, JobQueue, QueueItemError, QueueStoreError
from gateway.metrics import END_TO_END_BUCKETS
from gateway.stores import job_queue
from gateway.tasks import Category, ImagePrompt, Task, TextPrompt
from gateway.tenants.model import tenant_key
from gateway.usage.report import portal_usage, portal_usage_rows
from tests.conftest import QueueStore

pytestmark = pytest.mark.anyio
TEXT = Outcome(result={"kind": "text", "text": "x"})
SHORT = 3.0
"""A lease (or delay) meant to run out within the test: long enough for the steps before it on a busy machine."""


def make_job(ttl: float = 100.0, callback_url: str = "http://p/cb?hash=a") -> Job:
    now = time.time()
    job_id = new_job_id()
    task = Task(job_id=job_id, engine="e", category=Category.TEXT, prompt=TextPrompt("p"), accepted_at=now, deadline=now + ttl)
    return Job(task, callback_url, "http://p/err?hash=a")


async def test_enqueue_is_idempotent(queue: JobQueue) -> None:
    first, created = await queue.enqueue(make_job(), "key-1", lease_owner=None, lease_seconds=5)
    again, created_again = await queue.enqueue(make_job(), "key-1", lease_owner=None, lease_seconds=5)
    assert created and not created_again and again.id == first.id
    assert await queue.depth() == 1


async def test_get_and_list(queue: JobQueue) -> None:
    queued, _ = await queue.enqueue(make_job(), "a", lease_owner=None, lease_seconds=5)
    running, _ = await queue.enqueue(make_job(), "b", lease_owner="w1", lease_seconds=5)
    assert await queue.get("no-such-job") is None
    stored = await queue.get(queued.id)
    assert stored is not None and stored.id == queued.id and stored.state is JobState.QUEUED
    assert stored.callback_url == "http://p/cb?hash=a" and stored.task.engine == "e"
    assert [job.id for job in await queue.list(state=JobState.RUNNING)] == [running.id]
    assert sorted(job.id for job in await queue.list()) == sorted([queued.id, running.id])
    assert len(await queue.list(limit=1)) == 1


async def test_claim_lease_expiry_and_resume(queue: JobQueue) -> None:
    job, _ = await queue.enqueue(make_job(), "k", lease_owner=None, lease_seconds=5)
    [claimed] = await queue.claim("w1", 10, lease_seconds=SHORT)
    assert claimed.id == job.id and claimed.state is JobState.RUNNING
    assert await queue.claim("w2", 10, lease_seconds=5) == []
    await asyncio.sleep(SHORT + 0.2)  # w1 died: its lease runs out
    [resumed] = await queue.claim("w2", 10, lease_seconds=5)
    assert resumed.id == job.id
    assert not await queue.store_outcome(job.id, "w1", TEXT, [])  # w1 lost it
    assert await queue.store_outcome(job.id, "w2", TEXT, [])


async def test_renew_keeps_the_lease_for_its_owner_only(queue: JobQueue) -> None:
    job, _ = await queue.enqueue(make_job(), "k", lease_owner=None, lease_seconds=5)
    await queue.claim("w1", 10, lease_seconds=SHORT)
    await queue.renew("w2", [job.id], 60)  # not its lease: no effect
    await queue.renew("w1", [job.id], 60)
    await asyncio.sleep(SHORT + 0.2)
    assert await queue.claim("w2", 10, lease_seconds=5) == []  # renewed: still w1's
    assert await queue.store_outcome(job.id, "w1", TEXT, [])


async def test_local_lease_at_enqueue(queue: JobQueue) -> None:
    job, _ = await queue.enqueue(make_job(), "k", lease_owner="w1", lease_seconds=5)
    assert job.state is JobState.RUNNING
    assert await queue.claim("w2", 10, lease_seconds=5) == []


async def test_outcome_then_final_state_once(queue: JobQueue) -> None:
    job, _ = await queue.enqueue(make_job(), "k", lease_owner="w1", lease_seconds=5)
    outcome = Outcome(error=JobError("boom", 503))
    attempt = Attempt("provider", "up/m", time.time(), 0.1, "retryable", "HTTP 500")
    assert await queue.store_outcome(job.id, "w1", outcome, [attempt])
    callback = Attempt("callback", "p", time.time(), 0.01, "delivered")
    assert await queue.finish(job.id, "w1", JobState.FAILED, "done", [callback])
    assert not await queue.finish(job.id, "w1", JobState.DELIVERED, "again", [])
    stored = await queue.get(job.id)
    assert stored is not None and stored.state is JobState.FAILED and stored.detail == "done"
    assert stored.outcome is not None and stored.outcome.error is not None and stored.outcome.error.code == 503
    assert [a.kind for a in stored.attempts] == ["provider", "callback"] and stored.delivery_attempts == 1
    assert stored.attempts[0].detail == "HTTP 500" and stored.attempts[0].target == "up/m"
    assert await queue.depth() == 0


async def test_reschedule_releases_and_delays(queue: JobQueue) -> None:
    job, _ = await queue.enqueue(make_job(), "k", lease_owner="w1", lease_seconds=5)
    await queue.store_outcome(job.id, "w1", TEXT, [])
    await queue.reschedule(job.id, "w1", time.time() + SHORT, Attempt("callback", "p", time.time(), 0.0, "retry", "HTTP 503"))
    assert await queue.claim("w2", 10, 5) == []
    await asyncio.sleep(SHORT + 0.2)
    [again] = await queue.claim("w2", 10, 5)
    assert again.state is JobState.DELIVERING and again.delivery_attempts == 1
    assert not again.interrupted_delivery  # released, not abandoned


async def test_abandoned_delivery_is_flagged(queue: JobQueue) -> None:
    job, _ = await queue.enqueue(make_job(), "k", lease_owner="w1", lease_seconds=SHORT)
    await queue.store_outcome(job.id, "w1", TEXT, [])
    await asyncio.sleep(SHORT + 0.2)
    [again] = await queue.claim("w2", 10, 5)
    assert again.interrupted_delivery


async def test_prune_deletes_only_old_final_jobs(queue: JobQueue) -> None:
    old, _ = await queue.enqueue(make_job(), "old", lease_owner="w", lease_seconds=5)
    await queue.finish(old.id, "w", JobState.EXPIRED, "gone", [Attempt("callback", "p", 0.0, 0.0, "retry")])
    pending, _ = await queue.enqueue(make_job(), "pending", lease_owner=None, lease_seconds=5)
    assert await queue.prune(time.time() - 3600, 10) == 0  # finished just now: kept
    assert await queue.prune(time.time() + 1, 10) == 1
    assert await queue.get(old.id) is None and (await queue.get(pending.id)) is not None


async def test_an_unreadable_stored_job_is_marked_dead_not_claimed_forever(queue: JobQueue, queue_store: QueueStore) -> None:
    broken, _ = await queue.enqueue(make_job(), "broken", lease_owner=None, lease_seconds=5)
    fine, _ = await queue.enqueue(make_job(), "fine", lease_owner=None, lease_seconds=5)
    await queue_store.corrupt_task(broken.id)
    claimed = await asyncio.wait_for(queue.claim("w", 10, 5), 5)
    assert [job.id for job in claimed] == [fine.id]
    stored = await queue.get(fine.id)
    assert stored is not None and stored.state is JobState.RUNNING
    row = await queue_store.row(broken.id)
    assert row["state"] == "dead" and row["detail"].startswith("the stored job cannot be read: JSONDecodeError") and row["finished_at"]
    assert await queue.claim("w", 10, 5) == []  # not offered again
    assert await queue.depth() == 1


async def test_an_unreadable_stored_job_is_still_listed_shown_and_ended(queue: JobQueue, queue_store: QueueStore) -> None:
    """Every read but a claim describes such a job from its columns: `jobs list`, the dashboard, a
    repeated request on its hash and an uninstall keep working around it."""
    now = time.time()
    done, _ = await queue.enqueue(varied_job("pics_b", Category.IMAGE, "acme.bitrix24.com", "member-1", now - 60), "done", lease_owner="w", lease_seconds=5)
    await queue.store_outcome(done.id, "w", TEXT, [Attempt("provider", "stub", now, 0.5, "ok")])
    await queue.finish(done.id, "w", JobState.DELIVERED, "", [Attempt("callback", "portal", now, 0.1, "delivered")])
    pending, _ = await queue.enqueue(varied_job("text_a", Category.TEXT, "acme.bitrix24.com", "member-1", now), "pending", lease_owner=None, lease_seconds=5)
    for job in (done, pending):
        await queue_store.corrupt_task(job.id)

    listed = {job.id: job for job in await queue.list(JobFilter(limit=10))}
    assert listed.keys() == {done.id, pending.id}
    shown = await queue.get(done.id)
    assert shown is not None and shown.detail.startswith("the stored job cannot be read: JSONDecodeError")
    assert (shown.engine, shown.category, shown.portal, shown.state, shown.outcome) == ("pics_b", Category.IMAGE, "acme.bitrix24.com", JobState.DELIVERED, TEXT)
    assert shown.accepted_at == pytest.approx(now - 60) and [a.kind for a in shown.attempts] == ["provider", "callback"]
    assert (shown.tenant, shown.task.tenant) == ("member-1", tenant_key("member-1"))
    assert [job.id for job in await queue.list(JobFilter(engine="pics_b", category="image", limit=10))] == [done.id]
    assert [job.id for job in await queue.finished_since(now - 5)] == [done.id]

    again, created = await queue.enqueue(
        varied_job("text_a", Category.TEXT, "acme.bitrix24.com", "member-1", now), "pending", lease_owner=None, lease_seconds=5
    )
    assert (again.id, created) == (pending.id, False)  # a repeated request is answered, not failed
    ended = await queue.end_tenant_jobs("member-1", "the portal uninstalled the app", delete=False)
    assert [job.id for job in ended] == [pending.id]
    assert (await queue_store.row(pending.id))["state"] == "dead"


async def test_separate_claim_limits_for_running_and_delivering(queue: JobQueue) -> None:
    to_deliver = []
    for i in range(3):
        job, _ = await queue.enqueue(make_job(), f"d{i}", lease_owner="w1", lease_seconds=5)
        await queue.store_outcome(job.id, "w1", TEXT, [])
        to_deliver.append(job.id)
    await queue.release("w1", to_deliver)
    for i in range(3):
        await queue.enqueue(make_job(), f"r{i}", lease_owner=None, lease_seconds=5)
    claimed = await queue.claim("w2", 1, 5, delivery_limit=2)
    assert sorted(job.state.value for job in claimed) == ["delivering", "delivering", "running"]
    assert [job.state for job in await queue.claim("w2", 0, 5, delivery_limit=5)] == [JobState.DELIVERING]


async def test_internal_errors_deferrals_and_unconfirmed_deliveries_are_remembered(queue: JobQueue) -> None:
    job, _ = await queue.enqueue(make_job(), "k", lease_owner="w1", lease_seconds=5)
    failure = Attempt("internal", "execute", time.time(), 0.0, "error", "RuntimeError: \ud800 and \x00 in a message")
    assert await queue.retry_later(job.id, "w1", time.time(), failure)  # a running job: the model work is retried
    [again] = await queue.claim("w2", 10, 5)
    assert again.internal_errors == 1 and again.state is JobState.RUNNING and not again.interrupted_delivery
    await queue.store_outcome(job.id, "w2", TEXT, [])
    timed_out = Attempt("callback", "p", time.time(), 5.0, "retry", "ReadTimeout")
    assert await queue.reschedule(job.id, "w2", time.time(), timed_out, maybe_delivered=True)
    [again] = await queue.claim("w3", 10, 5)
    assert again.maybe_delivered and again.delivery_attempts == 1
    assert await queue.reschedule(job.id, "w3", time.time(), Attempt("callback", "p", time.time(), 0.0, "retry", "HTTP 503"))
    assert await queue.defer(job.id, "w4", time.time()) is False  # not its lease
    [again] = await queue.claim("w4", 10, 5)
    assert again.maybe_delivered  # a later plain failure does not erase it
    assert await queue.defer(job.id, "w4", time.time() + 60)
    assert await queue.claim("w5", 10, 5) == []
    stored = await queue.get(job.id)
    assert stored is not None
    assert [a.kind for a in stored.attempts] == ["internal", "callback", "callback"]
    assert stored.attempts[0].detail == "RuntimeError: \\ud800 and \\x00 in a message"  # stored escaped, not a failed write


async def test_release_defer_and_retry_later_keep_a_maybe_delivered_mark(queue: JobQueue) -> None:
    """Releasing a lease clears its owner, which is how a claim tells a crash: the mark must go to the row instead."""
    ids = []
    for key in ("cut-off", "waiting", "deferred", "retried"):
        job, _ = await queue.enqueue(make_job(), key, lease_owner="w1", lease_seconds=5)
        await queue.store_outcome(job.id, "w1", TEXT, [])
        ids.append(job.id)
    cut_off, waiting, deferred, retried = ids
    await queue.release("w1", [cut_off, waiting], maybe_delivered={cut_off})
    assert await queue.defer(deferred, "w1", time.time(), maybe_delivered=True)
    assert await queue.retry_later(
        retried, "w1", time.time(), Attempt("internal", "deliver", time.time(), 0.0, "error", "QueueStoreError"), maybe_delivered=True
    )
    claimed = {job.id: (job.maybe_delivered, job.interrupted_delivery) for job in await queue.claim("w2", 0, 5, delivery_limit=10)}
    assert claimed == {cut_off: (True, False), waiting: (False, False), deferred: (True, False), retried: (True, False)}


@pytest.mark.parametrize("bad_url", ["http://p/cb?hash=\ud800", "http://p/cb?hash=\x00"], ids=["lone-surrogate", "nul"])
async def test_a_job_the_backend_cannot_encode_fails_alone_and_the_queue_goes_on(queue: JobQueue, bad_url: str) -> None:
    """A value a backend cannot store (a lone surrogate: neither can; a NUL: PostgreSQL's text
    cannot) fails that one enqueue with :class:`QueueItemError` (the accept path may answer 4xx),
    or is stored as it came; the jobs beside it and after it are stored either way."""
    bad = asyncio.ensure_future(queue.enqueue(make_job(callback_url=bad_url), "bad", lease_owner=None, lease_seconds=5))
    beside = asyncio.ensure_future(queue.enqueue(make_job(), "beside", lease_owner=None, lease_seconds=5))
    try:
        stored_bad, _ = await asyncio.wait_for(bad, 5)
    except QueueStoreError as error:
        assert type(error) is QueueItemError, f"{type(error).__name__}: {error}"  # the job, not the queue
        assert str(error).startswith("this job cannot be stored: ")
        stored_bad = None
    if "\ud800" in bad_url:
        assert stored_bad is None  # no backend stores a lone surrogate
    _, created = await asyncio.wait_for(beside, 5)
    later, created_later = await asyncio.wait_for(queue.enqueue(make_job(), "later", lease_owner=None, lease_seconds=5), 5)
    assert created and created_later
    assert await asyncio.wait_for(queue.depth(), 5) == (2 if stored_bad is None else 3)
    stored_later = await queue.get(later.id)
    assert stored_later is not None and stored_later.state is JobState.QUEUED
    if stored_bad is not None:
        again = await queue.get(stored_bad.id)
        assert again is not None and again.callback_url == bad_url  # stored as it came, not altered


async def test_a_closed_queue_refuses_work_with_a_queue_error(queue_store: QueueStore) -> None:
    q = job_queue(queue_store.settings)
    await q.open()
    await q.close()
    with pytest.raises(QueueStoreError):
        await q.enqueue(make_job(), "late", lease_owner=None, lease_seconds=5)


# -- concurrency: several queue objects on one store, as several processes or nodes -------------------


async def open_queues(store: QueueStore, count: int) -> list[JobQueue]:
    """``count`` queue objects on one store, each with its own connection(s). (SQLite queues in one
    process once deadlocked here: waiting for each other's write lock in the event loop's shared
    thread pool, they took every thread while the holder's COMMIT waited behind them; each queue
    now has a thread of its own.)"""
    queues = [job_queue(store.settings) for _ in range(count)]
    await asyncio.gather(*(q.open() for q in queues))
    return queues


async def close_queues(queues: list[JobQueue]) -> None:
    await asyncio.gather(*(q.close() for q in queues), return_exceptions=True)


async def test_concurrent_claimers_never_hold_the_same_job(queue_store: QueueStore) -> None:
    """8 claimers on their own connections take 200 jobs at once, in small bites: every job is
    claimed exactly once while the leases hold, none is left behind."""
    queues = await open_queues(queue_store, 8)
    try:
        jobs = await asyncio.gather(*(queues[i % len(queues)].enqueue(make_job(), f"k{i}", lease_owner=None, lease_seconds=60) for i in range(200)))
        expected = {job.id for job, _ in jobs}
        assert len(expected) == 200

        async def claimer(q: JobQueue, owner: str) -> list[tuple[str, str]]:
            got: list[tuple[str, str]] = []
            for _ in range(200):  # bounded: 200 jobs take at most 200 non-empty claims
                batch = await q.claim(owner, 3, lease_seconds=60)
                if not batch:
                    return got
                got += [(job.id, owner) for job in batch]
                await asyncio.sleep(0)
            return got

        results = await asyncio.wait_for(asyncio.gather(*(claimer(q, f"w{i}") for i, q in enumerate(queues))), 120)
        claims = [claim for result in results for claim in result]
        twice = [job_id for job_id, count in Counter(job_id for job_id, _ in claims).items() if count > 1]
        assert twice == [], f"{len(twice)} jobs were claimed twice within their lease"
        assert {job_id for job_id, _ in claims} == expected
        assert await queues[0].claim("late", 10, lease_seconds=60) == []
        # Each lease is held by the claimer that got the job, and by no other.
        stolen = await asyncio.gather(*(queues[1].store_outcome(job_id, "someone-else", TEXT, []) for job_id, _ in claims))
        assert not any(stolen)
        stored = await asyncio.gather(*(queues[int(owner[1:])].store_outcome(job_id, owner, TEXT, []) for job_id, owner in claims))
        assert all(stored)
    finally:
        await close_queues(queues)


async def test_concurrent_duplicate_accepts_make_one_job(queue_store: QueueStore) -> None:
    """The same idempotency key enqueued at once through 20 queue objects (connections; SQLite: 4): exactly one
    is created, every other caller gets that job's id back."""
    queues = await open_queues(queue_store, 20)
    try:
        results = await asyncio.wait_for(asyncio.gather(*(q.enqueue(make_job(), "portal-hash-1", lease_owner=None, lease_seconds=60) for q in queues)), 60)
        assert sum(created for _, created in results) == 1
        assert len({job.id for job, _ in results}) == 1
        assert await queues[0].depth() == 1
        # And with the accepting worker's lease, as a node with a free slot enqueues: still one job, one owner.
        results = await asyncio.wait_for(
            asyncio.gather(*(q.enqueue(make_job(), "portal-hash-2", lease_owner=f"n{i}", lease_seconds=60) for i, q in enumerate(queues))), 60
        )
        assert sum(created for _, created in results) == 1 and len({job.id for job, _ in results}) == 1
        [running] = await queues[0].list(state=JobState.RUNNING)
        assert running.id == results[0][0].id
        held = await asyncio.gather(*(q.store_outcome(running.id, f"n{i}", TEXT, []) for i, q in enumerate(queues)))
        assert sum(held) == 1 and held.index(True) == next(i for i, (_, created) in enumerate(results) if created)  # the creator's lease
        assert await queues[0].depth() == 2
    finally:
        await close_queues(queues)


# -- the dashboard's reads: filters, pages, activity; the portal column on an older store ----------------


def varied_job(engine: str, category: Category, portal: str, tenant: str, accepted_at: float, ttl: float = 100.0) -> Job:
    prompt = ImagePrompt("a cat") if category is Category.IMAGE else TextPrompt("p")
    task = Task(
        job_id=new_job_id(), engine=engine, category=category, prompt=prompt, accepted_at=accepted_at, deadline=accepted_at + ttl, portal=portal, tenant=tenant
    )
    return Job(task, f"http://{portal}/cb?hash=a", f"http://{portal}/err?hash=a", tenant=tenant)


async def store_varied_jobs(queue: JobQueue, now: float) -> list[Job]:
    """12 jobs over two engines, two categories, two portals (one in upper case), two tenants, four
    acceptance times and three states, in an order that differs from their acceptance times."""
    jobs = []
    for i in range(12):
        await asyncio.sleep(0.002)  # ids order by their millisecond first: creation order is the listing order
        job = varied_job(
            engine=("text_a", "pics_b")[i % 2],
            category=(Category.TEXT, Category.IMAGE)[i % 2],
            portal=("acme.bitrix24.com", "Beta.Bitrix24.DE")[(i // 2) % 2],
            tenant=("", "member-1")[(i // 3) % 2],
            accepted_at=now - (300, 3600, 30, 7200)[i % 4],
        )
        owner = "w" if i % 3 else None
        stored, _ = await queue.enqueue(job, f"varied-{i}", lease_owner=owner, lease_seconds=30)
        if i % 3 == 2:
            assert await queue.finish(stored.id, "w", JobState.DELIVERED, "data:true", [])
        jobs.append(stored)
    return jobs


FILTER_VALUES: dict[str, Any] = {
    "state": JobState.RUNNING,
    "engine": "pics_b",
    "category": "text",
    "portal": "BETA.bitrix24.de",
    "tenant": "member-1",
    "accepted_since": -4000.0,
    "accepted_until": -200.0,
    "before_id": None,  # set to the id of the 9th newest job
}


def matches(job: Job, field: str, value: Any) -> bool:
    """What each filter means, in Python: the reference the SQL is held to."""
    stored_state = job.state
    return {
        "state": lambda: stored_state is value,
        "engine": lambda: job.engine == value,
        "category": lambda: job.category == value,
        "portal": lambda: job.portal == value.lower(),
        "tenant": lambda: job.tenant == value,
        "accepted_since": lambda: job.accepted_at >= value,
        "accepted_until": lambda: job.accepted_at < value,
        "before_id": lambda: job.id < value,
    }[field]()


async def test_every_combination_of_filters_lists_what_it_should(queue: JobQueue) -> None:
    """Each of the 2^8 combinations of the eight filters, against the same filters applied in Python."""
    now = time.time()
    await store_varied_jobs(queue, now)
    everything = await queue.list(JobFilter(limit=500))
    assert len(everything) == 12 and [job.id for job in everything] == sorted((job.id for job in everything), reverse=True)  # newest first
    values = {**FILTER_VALUES, "accepted_since": now - 4000, "accepted_until": now - 200, "before_id": everything[3].id}
    names = list(values)
    answers = set()
    for mask in range(1 << len(names)):
        chosen = {name: values[name] for bit, name in enumerate(names) if mask & (1 << bit)}
        listed = await queue.list(JobFilter(**chosen, limit=500))
        expected = [job.id for job in everything if all(matches(job, name, value) for name, value in chosen.items())]
        assert [job.id for job in listed] == expected, f"filters {chosen}"
        answers.add(tuple(expected))
    assert len(answers) > 40 and () in answers  # the jobs tell the filters apart: most combinations answer differently
    assert len(await queue.list(JobFilter(engine="pics_b", portal="acme.bitrix24.com"))) == 3
    assert await queue.list(JobFilter(engine="text_a", category="image")) == []


async def test_pages_of_older_jobs_follow_each_other(queue: JobQueue) -> None:
    await store_varied_jobs(queue, time.time())
    pages, before = [], None
    for _ in range(10):  # bounded: 12 jobs in pages of 5
        page = await queue.list(JobFilter(before_id=before, limit=5))
        if not page:
            break
        pages.append([job.id for job in page])
        before = page[-1].id
    assert [len(page) for page in pages] == [5, 5, 2]
    assert [job_id for page in pages for job_id in page] == [job.id for job in await queue.list(limit=100)]
    assert [job.id for job in await queue.list(JobFilter(state=JobState.DELIVERED, before_id=pages[0][0], limit=2))] == [
        job.id for job in await queue.list(state=JobState.DELIVERED) if job.id < pages[0][0]
    ][:2]


def bucket_of(latency: float) -> int:
    return next((i for i, bound in enumerate(END_TO_END_BUCKETS) if latency <= bound), len(END_TO_END_BUCKETS))


async def test_activity_counts_per_minute_engine_state_and_latency_bucket(queue: JobQueue) -> None:
    now = time.time()
    since = now - 3000
    jobs = []
    for i, (engine, latency, state) in enumerate(
        [
            ("text_a", 7.0, JobState.DELIVERED),  # bucket 8 (<= 10 s)
            ("text_a", 7.0, JobState.DELIVERED),
            ("text_a", 40.0, JobState.FAILED),  # bucket 10 (<= 60 s)
            ("pics_b", 40.0, JobState.EXPIRED),
            ("pics_b", 20000.0, JobState.DEAD),  # accepted before `since`, finished after it: +Inf
            ("text_a", 1000.0, None),  # pending: queued
            ("pics_b", 5000.0, None),  # pending, accepted before `since`: counted as pending only
        ]
    ):
        category = Category.IMAGE if engine == "pics_b" else Category.TEXT
        job, _ = await queue.enqueue(
            varied_job(engine, category, "p", "", now - latency, ttl=30000), f"a{i}", lease_owner="w" if state else None, lease_seconds=30
        )
        if state is not None:
            assert await queue.finish(job.id, "w", state, "", [])
        jobs.append(job)
    running, _ = await queue.enqueue(varied_job("text_a", Category.TEXT, "p", "", now - 1), "running", lease_owner="w", lease_seconds=30)
    delivering, _ = await queue.enqueue(varied_job("text_a", Category.TEXT, "p", "", now - 1), "delivering", lease_owner="w", lease_seconds=30)
    assert await queue.store_outcome(delivering.id, "w", TEXT, [])
    stored = [job for job in [await queue.get(job.id) for job in [*jobs, running, delivering]] if job is not None]

    activity = await queue.activity(since)
    assert activity.since == since
    assert activity.pending == {JobState.QUEUED: 2, JobState.RUNNING: 1, JobState.DELIVERING: 1}
    accepted = Counter({(int(job.accepted_at // 60) * 60, job.engine, str(job.category)): 0 for job in stored if job.accepted_at >= since})
    for job in stored:
        if job.accepted_at >= since:
            accepted[int(job.accepted_at // 60) * 60, job.engine, str(job.category)] += 1
    assert {(a.minute, a.engine, a.category): a.count for a in activity.accepted} == dict(accepted)
    assert sum(a.count for a in activity.accepted) == 7  # all but the two accepted before `since`
    finished: Counter[tuple[int, str, str, JobState, int]] = Counter()
    for job in stored:
        if job.finished_at is not None:
            finished[int(job.finished_at // 60) * 60, job.engine, str(job.category), job.state, bucket_of(job.finished_at - job.accepted_at)] += 1
    assert {(f.minute, f.engine, f.category, f.state, f.bucket): f.count for f in activity.finished} == dict(finished)
    by_state = sorted((f.engine, f.state.value, f.bucket, f.count) for f in activity.finished)
    assert by_state == [("pics_b", "dead", 16, 1), ("pics_b", "expired", 10, 1), ("text_a", "delivered", 8, 2), ("text_a", "failed", 10, 1)]
    later = await queue.activity(time.time() + 120)
    assert later.accepted == () and later.finished == () and later.pending == activity.pending


OLD_JOB_COLUMNS = "id, idem_key, engine, category, state, task, callback_url, error_callback_url, accepted_at, deadline, next_at"


async def create_old_store(store: QueueStore, rows: list[tuple[Any, ...]]) -> None:
    """The store as a gateway from before the ``portal`` column left it, holding ``rows`` (:data:`OLD_JOB_COLUMNS`)."""
    if store.name == "sqlite":
        import sqlite3

        old = sqlite3.connect(store.settings.path)
        old.executescript("""
            CREATE TABLE jobs (id TEXT PRIMARY KEY, idem_key TEXT NOT NULL UNIQUE, engine TEXT NOT NULL, category TEXT NOT NULL,
                state TEXT NOT NULL, task TEXT NOT NULL, callback_url TEXT NOT NULL, error_callback_url TEXT NOT NULL,
                accepted_at REAL NOT NULL, deadline REAL NOT NULL, next_at REAL NOT NULL, lease_owner TEXT, lease_until REAL,
                outcome TEXT, delivery_attempts INTEGER NOT NULL DEFAULT 0, finished_at REAL, detail TEXT NOT NULL DEFAULT '');
        """)
        old.executemany(f"INSERT INTO jobs ({OLD_JOB_COLUMNS}) VALUES ({', '.join('?' * 11)})", rows)
        old.commit()
        old.close()
        return
    import asyncpg

    from gateway.postgres import schema

    conn = await asyncpg.connect(store.settings.dsn)
    try:
        await conn.execute("CREATE TABLE gateway_migrations (version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        for migration in schema.MIGRATIONS[:2]:
            await conn.execute(migration.sql)
            await conn.execute("INSERT INTO gateway_migrations (version, name) VALUES ($1, $2)", migration.version, migration.name)
        await conn.executemany(f"INSERT INTO gateway_jobs ({OLD_JOB_COLUMNS}) VALUES ({', '.join(f'${n}' for n in range(1, 12))})", rows)
    finally:
        await conn.close()


async def test_an_older_store_gets_the_portal_of_its_jobs(queue_store: QueueStore) -> None:
    """A store from before the ``portal`` column (SQLite: the first schema; PostgreSQL: migrations 1
    and 2) is upgraded on open, and its jobs get their portal from their callback URL's host."""
    callbacks = {
        "acme.bitrix24.com": "https://Acme.Bitrix24.COM/bitrix/services/main/ajax.php?hash=a",
        "127.0.0.1": "http://user:pw@127.0.0.1:8443/cb?hash=b",
        "beta.bitrix24.de": "https://beta.bitrix24.de?hash=c",
        "::1": "http://[::1]:8080/cb?hash=d",
    }
    now = time.time()
    rows = []
    for i, url in enumerate(callbacks.values()):
        job = make_job(callback_url=url)
        rows.append((job.id, f"old-{i}", "e", "text", "queued", json.dumps(job.task.to_json()), url, url, now, now + 100, now))
    await create_old_store(queue_store, rows)
    q = job_queue(queue_store.settings)
    await q.open()
    try:
        for host, url in callbacks.items():
            assert [job.callback_url for job in await q.list(JobFilter(portal=host))] == [url], host
        new, _ = await q.enqueue(varied_job("e", Category.TEXT, "new.bitrix24.com", "", now), "new", lease_owner=None, lease_seconds=5)
        assert [job.id for job in await q.list(JobFilter(portal="New.Bitrix24.com"))] == [new.id]
        assert len(await q.list(JobFilter(accepted_since=now))) == len(callbacks) + 1
    finally:
        await q.close()


# -- usage totals: counted by the database, the same as adding up the jobs in Python ------------------


async def set_finished_at(store: QueueStore, job_id: str, when: float) -> None:
    """Move a final job's end to another time (``finish`` stamps now), as if it had ended then."""
    if store.name == "sqlite":
        import sqlite3

        conn = sqlite3.connect(store.settings.path, isolation_level=None, timeout=10)
        try:
            assert conn.execute("UPDATE jobs SET finished_at = ? WHERE id = ?", (when, job_id)).rowcount == 1
        finally:
            conn.close()
        return
    import asyncpg

    conn = await asyncpg.connect(store.settings.dsn)
    try:
        assert await conn.execute("UPDATE gateway_jobs SET finished_at = $1 WHERE id = $2", when, job_id) == "UPDATE 1"
    finally:
        await conn.close()


WEIRD_TEXT = "NUL \x00 here, a lone surrogate \ud800, an emoji \U0001f600, привет, a backslash-u \\u0000 and C:\\new\\u12 \\\\\x00"
"""A transcript the JSON text stores as ``\\u0000``, ``\\ud800``, a surrogate pair and escaped backslashes
before ``u``: what PostgreSQL's ``json`` and ``jsonb`` cannot read as stored."""
USAGE_OUTCOMES: list[tuple[str, Outcome | None, JobState]] = [
    ("text_a", Outcome(result={"kind": "text", "text": "x", "usage": {"prompt_tokens": 7, "completion_tokens": 3, "cost_usd": 0.5}}), JobState.DELIVERED),
    ("text_a", Outcome(result={"kind": "text", "text": "x", "usage": None}), JobState.DELIVERED_UNCONFIRMED),
    ("text_a", Outcome(result={"kind": "text", "text": "no usage key"}), JobState.DELIVERED),
    ("text_a", Outcome(result={"kind": "text", "text": "y", "usage": {"prompt_tokens": 5.9, "completion_tokens": 1, "total_tokens": 7}}), JobState.DELIVERED),
    ("text_a", Outcome(error=JobError("boom", 502)), JobState.FAILED),
    ("text_a", None, JobState.EXPIRED),  # ended before its task stored an outcome
    ("text_a", Outcome(result={}), JobState.DELIVERED),  # an empty result: no result
    ("call_b", Outcome(result={"kind": "transcript", "text": "t", "duration": 90.25, "usage": {"cost_usd": 0.125}}), JobState.DELIVERED),
    ("call_b", Outcome(result={"kind": "transcript", "text": "t", "duration": 30, "usage": {"cost_usd": 0.1, "prompt_tokens": 2}}), JobState.GONE),
    (
        "call_b",
        Outcome(result={"kind": "transcript", "text": "t", "duration": "12", "usage": {"prompt_tokens": "12", "completion_tokens": True}}),
        JobState.DELIVERED,
    ),
    ("call_b", Outcome(error=JobError("no recording", 400), provider="up/m"), JobState.DEAD),
    (
        "weird_c",
        Outcome(result={"kind": "transcript", "text": WEIRD_TEXT, "duration": 12.5, "usage": {"prompt_tokens": 11, "cost_usd": 0.25}}),
        JobState.DELIVERED,
    ),
]
"""Outcomes with and without a result, usage, cost and duration; numbers that are no JSON numbers (a
string, a boolean) count nothing; a float token count is truncated, as ``int()`` does."""


async def store_usage_jobs(queue: JobQueue, store: QueueStore, now: float, since: float) -> list[Job]:
    """Every outcome of :data:`USAGE_OUTCOMES` on two portals (one in mixed case), two tenants and four
    end times: today, yesterday, three days ago, 0.4 ms before a UTC midnight (the day before it);
    every fifth at exactly ``since`` (counted) and the last one before it (not counted); and two jobs not
    yet final (never counted)."""
    midnight = (now // 86400 - 1) * 86400
    ends = [now - 60, now - 86400, now - 3 * 86400, midnight - 0.0004]
    jobs = []
    for i, (engine, outcome, state) in enumerate(USAGE_OUTCOMES * 3):
        job = varied_job(engine, Category.TEXT, ("acme.bitrix24.com", "Beta.Bitrix24.DE")[i % 2], ("", "member-1")[(i // 2) % 2], now - 4 * 86400)
        stored, _ = await queue.enqueue(job, f"usage-{i}", lease_owner="w", lease_seconds=30)
        if outcome is not None:
            assert await queue.store_outcome(stored.id, "w", outcome, [])
        assert await queue.finish(stored.id, "w", state, "", [])
        ended = since if i % 5 == 4 else ends[i % len(ends)]
        await set_finished_at(store, stored.id, since - 1 if i == len(USAGE_OUTCOMES) * 3 - 1 else ended)
        jobs.append(stored)
    await queue.enqueue(varied_job("text_a", Category.TEXT, "acme.bitrix24.com", "", now), "usage-queued", lease_owner=None, lease_seconds=30)
    delivering, _ = await queue.enqueue(
        varied_job("text_a", Category.TEXT, "acme.bitrix24.com", "", now), "usage-delivering", lease_owner="w", lease_seconds=30
    )
    assert await queue.store_outcome(delivering.id, "w", USAGE_OUTCOMES[0][1] or TEXT, [])
    return jobs


async def test_usage_totals_add_up_what_the_jobs_hold(queue: JobQueue, queue_store: QueueStore) -> None:
    """The database's sums (:meth:`JobQueue.usage_totals`) against the same jobs loaded and added up in
    Python (:func:`portal_usage`, the reference), for all jobs and for one tenant; then the figures themselves."""
    now = time.time()
    since = now - 5 * 86400
    await store_usage_jobs(queue, queue_store, now, since)
    finished = await queue.finished_since(since)
    assert len(finished) == len(USAGE_OUTCOMES) * 3 - 1  # the last one ended before `since`; the pending two are not final

    totals = await queue.usage_totals(since)
    assert portal_usage_rows(totals) == portal_usage(finished)
    assert [(t.day, t.engine, t.portal) for t in totals] == sorted({(t.day, t.engine, t.portal) for t in totals})  # one row each, in order
    member = await queue.usage_totals(since, tenant="member-1")
    assert portal_usage_rows(member) == portal_usage(await queue.finished_since(since, tenant="member-1"))
    assert 0 < sum(t.jobs for t in member) < sum(t.jobs for t in totals)
    assert await queue.usage_totals(since, tenant="nobody") == [] and await queue.usage_totals(now + 60) == []

    # The figures, independently of the reference: 35 jobs; in each round of 12 outcomes, 4 without a result.
    assert sum(t.jobs for t in totals) == 35 and sum(t.errors for t in totals) == 3 * 4  # the one before `since` has a result
    assert {t.portal for t in totals} == {"acme.bitrix24.com", "beta.bitrix24.de"}
    by_engine: dict[str, list[float]] = {}
    for t in totals:
        sums = by_engine.setdefault(t.engine, [0, 0, 0, 0.0, 0.0])
        for n, value in enumerate((t.prompt_tokens, t.completion_tokens, t.jobs - t.errors, t.cost_usd, t.audio_seconds)):
            sums[n] += value
    assert by_engine["text_a"] == pytest.approx([3 * (7 + 5), 3 * (3 + 1), 3 * 4, 3 * 0.5, 0.0])
    assert by_engine["call_b"] == pytest.approx([3 * 2, 0, 3 * 3, 3 * (0.125 + 0.1), 3 * (90.25 + 30)])
    assert by_engine["weird_c"] == pytest.approx([2 * 11, 0, 2, 2 * 0.25, 2 * 12.5])  # the NUL and the lone surrogate neither fail the query nor drop the job
    days = {t.day for t in totals}
    midnight_day = datetime.fromtimestamp((now // 86400 - 1) * 86400 - 1, UTC).date().isoformat()
    assert midnight_day in days and datetime.fromtimestamp(since, UTC).date().isoformat() in days and len(days) >= 4


async def test_a_transcript_with_a_nul_is_stored_as_an_escape_the_usage_totals_read(queue: JobQueue, queue_store: QueueStore) -> None:
    """What the usage statement copes with: the outcome text holds ``\\u0000`` and ``\\ud800`` as written
    by ``json.dumps``, which PostgreSQL's own JSON operators refuse (SQLite's do not mind)."""
    now = time.time()
    job, _ = await queue.enqueue(varied_job("weird_c", Category.TEXT, "acme.bitrix24.com", "", now), "nul", lease_owner="w", lease_seconds=30)
    assert await queue.store_outcome(job.id, "w", USAGE_OUTCOMES[-1][1] or TEXT, [])
    assert await queue.finish(job.id, "w", JobState.DELIVERED, "", [])
    stored = await queue.get(job.id)
    assert stored is not None and stored.outcome is not None and stored.outcome.result is not None and stored.outcome.result["text"] == WEIRD_TEXT
    [count] = await queue.usage_totals(now - 60)
    assert (count.engine, count.jobs, count.errors, count.prompt_tokens, count.cost_usd, count.audio_seconds) == ("weird_c", 1, 0, 11, 0.25, 12.5)
    if queue_store.name == "postgres":
        import asyncpg

        conn = await asyncpg.connect(queue_store.settings.dsn)
        try:
            outcome = await conn.fetchval("SELECT outcome FROM gateway_jobs WHERE id = $1", job.id)
            assert "\\u0000" in outcome and "\\ud800" in outcome
            with pytest.raises(asyncpg.UntranslatableCharacterError):  # why usage_totals reads a copy without escapes
                await conn.fetchval("SELECT outcome::json #>> '{result,usage,prompt_tokens}' FROM gateway_jobs WHERE id = $1", job.id)
        finally:
            await conn.close()
