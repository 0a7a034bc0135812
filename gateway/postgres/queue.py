"""The job queue on the shared PostgreSQL database.

Any number of processes on any hosts accept into it and claim from it:

- an accept is one statement (``INSERT ... ON CONFLICT (idem_key) DO NOTHING``), committed before
  the 202; the portal's hash is unique across the cluster, so a repeat sent to another node finds
  the first job. Concurrent commits share WAL flushes in PostgreSQL itself (its group commit);
- a claim locks due rows with ``FOR UPDATE SKIP LOCKED`` and leases them in the same statement:
  claimers never wait for each other nor take the same job;
- a job queued for any worker (not leased at accept) sends ``NOTIFY gateway_jobs`` with its
  commit; every process ``LISTEN``\\ s on a connection of its own and claims at once. The poll
  (``queue.poll_interval``) is a safety net for a lost notification, retries falling due and
  leases running out;
- every state change is one statement, conditional on the lease like the SQLite queue's.

Times are the nodes' clocks (Unix seconds), as in the SQLite queue: keep the nodes' clocks in
step (NTP); a skew well under the lease (30 s) changes nothing.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import time
from collections.abc import Callable
from typing import Any

from gateway.config import QueueSettings
from gateway.jobs.model import Job
from gateway.jobs.queue import (
    CANCELLED,
    NO_SUCH_JOB,
    AcceptedCount,
    Action,
    Activity,
    FinishedCount,
    JobActionRefused,
    JobFilter,
    PortalUsageCount,
    QueueStoreError,
    action_refusal,
    plausible_job_id,
)
from gateway.jobs.rows import (
    INSERT_COLUMNS,
    filter_where,
    insert_values,
    job_from_row,
    latency_bucket_sql,
    outcome_json,
    readable_job_from_row,
    storable,
    unreadable,
)
from gateway.outcomes import FINAL_STATES, PENDING_STATES, Attempt, AttemptKind, AttemptOutcome, JobState, Outcome, stored_attempt
from gateway.postgres import schema
from gateway.postgres.database import Database, describe
from gateway.postgres.database import log as db_log
from gateway.supervision import Supervisor

log = logging.getLogger("gateway.queue")
CHANNEL = "gateway_jobs"
LISTEN_CHECK = 15.0
"""Seconds between checks that the listening connection is alive (a dead TCP peer sends no FIN)."""
PENDING = schema.PENDING_SQL
Q, R, D, DEAD = (f"'{state}'" for state in (JobState.QUEUED, JobState.RUNNING, JobState.DELIVERING, JobState.DEAD))

INSERT = (
    f"INSERT INTO gateway_jobs ({', '.join(INSERT_COLUMNS)}) VALUES ({', '.join(f'${n}' for n in range(1, len(INSERT_COLUMNS) + 1))})"
    " ON CONFLICT (idem_key) DO NOTHING RETURNING id"
)
INSERT_AND_NOTIFY = f"WITH inserted AS ({INSERT}) SELECT id, pg_notify('{CHANNEL}', '') FROM inserted"
DUE = "next_at <= $1 AND (lease_until IS NULL OR lease_until <= $1)"
CLAIM = f"""
WITH to_run AS (
    SELECT id, state AS was, lease_owner AS held_by FROM gateway_jobs
    WHERE state IN ({Q}, {R}) AND {DUE} ORDER BY next_at LIMIT $2 FOR UPDATE SKIP LOCKED
), to_deliver AS (
    SELECT id, state AS was, lease_owner AS held_by FROM gateway_jobs
    WHERE state = {D} AND {DUE} ORDER BY next_at LIMIT $3 FOR UPDATE SKIP LOCKED
), due AS (SELECT * FROM to_run UNION ALL SELECT * FROM to_deliver)
UPDATE gateway_jobs AS j SET state = CASE WHEN j.state = {Q} THEN {R} ELSE j.state END, lease_owner = $4, lease_until = $1 + $5
FROM due WHERE j.id = due.id
RETURNING j.*, due.was, due.held_by
"""
CLAIM_ANY = CLAIM.replace(f"WHERE state IN ({Q}, {R})", f"WHERE {PENDING}")
"""A claim with one limit for all due jobs, whether to run or to deliver."""
ATTEMPTS = (
    "INSERT INTO gateway_attempts (job_id, kind, target, started_at, duration, outcome, detail)"
    " SELECT changed.id, a.kind, a.target, a.started_at, a.duration, a.outcome, a.detail FROM changed,"
    " unnest(${0}::text[], $%d::text[], $%d::float8[], $%d::float8[], $%d::text[], $%d::text[]) AS a(kind, target, started_at, duration, outcome, detail)"
)


def _held_update(update: str, first_attempt_param: int) -> str:
    """One statement: an UPDATE that applies only while the caller holds the lease, and the
    attempts recorded with it (only if it applied); it answers 1 or 0."""
    n = first_attempt_param
    attempts = ATTEMPTS.replace("{0}", str(n)) % (n + 1, n + 2, n + 3, n + 4, n + 5)
    return f"WITH changed AS ({update} RETURNING id), recorded AS ({attempts}) SELECT count(*) FROM changed"


def _attempt_columns(attempts: list[Attempt]) -> tuple[list[str], list[str], list[float], list[float], list[str], list[str]]:
    return (
        [storable(a.kind) for a in attempts],
        [storable(a.target) for a in attempts],
        [a.started_at for a in attempts],
        [a.duration for a in attempts],
        [storable(a.outcome) for a in attempts],
        [storable(a.detail) for a in attempts],
    )


STORE_OUTCOME = _held_update(f"UPDATE gateway_jobs SET outcome = $1, state = {D} WHERE id = $2 AND lease_owner = $3 AND state = {R}", 4)
RESCHEDULE = _held_update(
    "UPDATE gateway_jobs SET next_at = $1, lease_owner = NULL, lease_until = NULL, delivery_attempts = delivery_attempts + 1,"
    f" detail = $2, maybe_delivered = maybe_delivered OR $3 WHERE id = $4 AND lease_owner = $5 AND state = {D}",
    6,
)
RETRY_LATER = _held_update(
    "UPDATE gateway_jobs SET next_at = $1, lease_owner = NULL, lease_until = NULL, internal_errors = internal_errors + 1, detail = $2,"
    f" maybe_delivered = maybe_delivered OR $3 WHERE id = $4 AND lease_owner = $5 AND state IN ({R}, {D})",
    6,
)
FINISH = _held_update(
    "UPDATE gateway_jobs SET state = $1, detail = $2, finished_at = $3, lease_owner = NULL, lease_until = NULL,"
    f" delivery_attempts = delivery_attempts + $4 WHERE id = $5 AND lease_owner = $6 AND {PENDING}",
    7,
)
FREE = "(lease_until IS NULL OR lease_until <= $2)"
CANCEL_RUN = (
    f"UPDATE gateway_jobs SET state = {D}, outcome = $3, next_at = $2, detail = $4, lease_owner = NULL, lease_until = NULL"
    f" WHERE id = $1 AND state IN ({Q}, {R}) AND {FREE}"
)
CANCEL_DELIVERY = (
    f"UPDATE gateway_jobs SET state = {DEAD}, detail = $3, finished_at = $2, lease_owner = NULL, lease_until = NULL WHERE id = $1 AND state = {D} AND {FREE}"
)
REDELIVER = (
    f"UPDATE gateway_jobs SET state = {D}, next_at = $2, finished_at = NULL, detail = '', internal_errors = 0, lease_owner = NULL, lease_until = NULL"
    f" WHERE id = $1 AND state = {DEAD} AND outcome IS NOT NULL AND deadline > $2"
)
"""The operator's actions ($1 the job, $2 now), run on the row locked and checked in the same transaction; each checks again."""
ACCEPTED_PER_MINUTE = (
    "SELECT (floor(accepted_at / 60) * 60)::bigint AS minute, engine, category, count(*) AS n FROM gateway_jobs WHERE accepted_at >= $1 GROUP BY 1, 2, 3"
)
FINISHED_PER_MINUTE = (
    f"SELECT (floor(finished_at / 60) * 60)::bigint AS minute, engine, category, state, {latency_bucket_sql('finished_at - accepted_at')} AS bucket,"
    " count(*) AS n FROM gateway_jobs WHERE finished_at >= $1 GROUP BY 1, 2, 3, 4, 5"
)


def _dispatch(callbacks: list[Callable[[str], None]], payload: str) -> None:
    for callback in callbacks:
        try:
            callback(payload)
        except Exception:  # one subscriber's bug must not silence the others, nor the listener
            log.exception("a NOTIFY subscriber failed")


def _dispatcher(callbacks: list[Callable[[str], None]]) -> Callable[..., None]:
    """asyncpg's listener signature (connection, pid, channel, payload) → the subscribers."""
    return lambda _conn, _pid, _channel, payload: _dispatch(callbacks, payload)


class PostgresJobQueue:
    def __init__(self, database: Database, *, supervisor: Supervisor | None = None) -> None:
        """``database`` is shared with this process's other stores; the queue opens and closes it.
        ``supervisor`` restarts the listener should it stop and reports it to ``/-/health``."""
        self.db = database
        self.settings: QueueSettings = database.settings
        self.supervisor = supervisor or Supervisor()
        self._subscribers: list[Callable[[], None]] = []
        database.listen(CHANNEL, lambda _payload: self._wake_subscribers())
        self._listener: asyncio.Task[None] | None = None
        self._open = False

    # -- lifecycle ------------------------------------------------------------------
    async def open(self) -> None:
        """Connect (waiting a while for a database that is starting), migrate the schema, listen."""
        await self.db.open()
        try:
            async with self.db.connection() as conn:
                applied = await schema.migrate(conn)
        except BaseException:
            await self.db.close()
            raise
        for migration in applied:
            log.info("database schema: applied migration %d (%s)", migration.version, migration.name)
        self._open = True
        self._listener = self.supervisor.start("queue-listener", self._listen_forever)

    async def close(self) -> None:
        if not self._open:
            return
        self._open = False
        await self.supervisor.stop("queue-listener")
        await self.db.close()

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when another process queues a job (a notification) or the listener
        reconnects (jobs may have been queued while it was away)."""
        self._subscribers.append(callback)

    def _wake_subscribers(self, *_: Any) -> None:
        for callback in self._subscribers:
            callback()

    async def _listen_forever(self) -> None:
        """Hold a connection that LISTENs; reconnect with backoff when it is lost (a database
        restart, a failover). Never ends but by cancellation."""
        pause = 0.5
        while True:
            conn: Any = None
            try:
                conn = await self.db.connect()
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                for channel, callbacks in self.db.channels.items():
                    await conn.add_listener(channel, _dispatcher(callbacks))
                if pause > 0.5:
                    db_log.info("PostgreSQL: listening for new jobs again")
                pause = 0.5
                for callbacks in self.db.channels.values():  # what changed while nobody listened
                    _dispatch(callbacks, "")
                while not lost.is_set():
                    try:
                        await asyncio.wait_for(lost.wait(), LISTEN_CHECK)
                    except TimeoutError:
                        await conn.execute("SELECT 1", timeout=LISTEN_CHECK)
                raise QueueStoreError("the listening connection was closed")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                db_log.warning("PostgreSQL: listening for new jobs failed (%s); reconnecting in %.1f s", describe(exc), pause)
            finally:
                if conn is not None:
                    conn.terminate()
            await asyncio.sleep(pause)
            pause = min(pause * 2, 10.0)

    # -- the protocol ---------------------------------------------------------------
    async def enqueue(self, job: Job, idempotency_key: str, *, lease_owner: str | None, lease_seconds: float) -> tuple[Job, bool]:
        state = JobState.RUNNING if lease_owner else JobState.QUEUED
        params = insert_values(job, idempotency_key, lease_owner=lease_owner, lease_seconds=lease_seconds, now=time.time())
        async with self.db.connection() as conn:
            # Leased here: this process runs it, nobody else needs waking.
            inserted = await conn.fetchval(INSERT if lease_owner else INSERT_AND_NOTIFY, *params, timeout=self.settings.connect_timeout)
            if inserted is not None:
                job.state = state
                return job, True
            existing = await conn.fetchrow("SELECT * FROM gateway_jobs WHERE idem_key = $1", idempotency_key)
        if existing is None:  # deleted between the two statements (pruned): cannot happen within retention
            raise QueueStoreError("a job with this idempotency key was just deleted; send the request again")
        return readable_job_from_row(existing), False

    async def claim(self, owner: str, limit: int, lease_seconds: float, *, delivery_limit: int | None = None) -> list[Job]:
        run_limit, deliver_limit = (limit, delivery_limit) if delivery_limit is not None else (limit, 0)
        if run_limit <= 0 and deliver_limit <= 0:
            return []
        now = time.time()
        async with self.db.connection() as conn:
            if delivery_limit is None:  # one pool for both: at most ``limit`` in all, oldest first
                rows = await conn.fetch(CLAIM_ANY, now, limit, 0, owner, lease_seconds)
            else:
                rows = await conn.fetch(CLAIM, now, run_limit, deliver_limit, owner, lease_seconds)
            jobs: list[Job] = []
            for row in rows:
                try:
                    job = job_from_row(row)
                except Exception as exc:  # one unreadable row must not block every claim after it
                    detail = unreadable("job", exc)
                    log.error("job %s: %s; marked dead", row["id"], detail)
                    await conn.execute(
                        f"UPDATE gateway_jobs SET state = {DEAD}, detail = $1, finished_at = $2, lease_owner = NULL, lease_until = NULL WHERE id = $3",
                        detail,
                        now,
                        row["id"],
                    )
                    continue
                # Reschedule and release clear the owner: one still set means its worker died.
                job.interrupted_delivery = row["was"] == JobState.DELIVERING and row["held_by"] is not None
                jobs.append(job)
        return jobs

    async def renew(self, owner: str, job_ids: list[str], lease_seconds: float) -> None:
        if job_ids:
            await self.db.run(
                lambda conn: conn.execute(
                    "UPDATE gateway_jobs SET lease_until = $1 WHERE id = ANY($2::text[]) AND lease_owner = $3", time.time() + lease_seconds, job_ids, owner
                )
            )

    async def release(self, owner: str, job_ids: list[str], *, maybe_delivered: frozenset[str] | set[str] = frozenset()) -> None:
        if not job_ids:
            return
        await self.db.run(
            lambda conn: conn.execute(
                "WITH released AS (UPDATE gateway_jobs SET lease_owner = NULL, lease_until = NULL, maybe_delivered = maybe_delivered OR id = ANY($3::text[])"
                f" WHERE id = ANY($1::text[]) AND lease_owner = $2 AND {PENDING} RETURNING id)"
                f" SELECT pg_notify('{CHANNEL}', '') WHERE EXISTS (SELECT 1 FROM released)",
                job_ids,
                owner,
                list(maybe_delivered),
            )
        )

    async def _held(self, sql: str, *params: Any, attempts: list[Attempt]) -> bool:
        changed = await self.db.run(lambda conn: conn.fetchval(sql, *params, *_attempt_columns(attempts)))
        return bool(changed == 1)

    async def store_outcome(self, job_id: str, owner: str, outcome: Outcome, attempts: list[Attempt]) -> bool:
        return await self._held(STORE_OUTCOME, outcome_json(outcome), job_id, owner, attempts=attempts)

    async def reschedule(self, job_id: str, owner: str, next_at: float, attempt: Attempt, *, maybe_delivered: bool = False) -> bool:
        return await self._held(RESCHEDULE, next_at, storable(attempt.detail), maybe_delivered, job_id, owner, attempts=[attempt])

    async def retry_later(self, job_id: str, owner: str, next_at: float, attempt: Attempt, *, maybe_delivered: bool = False) -> bool:
        return await self._held(RETRY_LATER, next_at, storable(attempt.detail), maybe_delivered, job_id, owner, attempts=[attempt])

    async def defer(self, job_id: str, owner: str, next_at: float, *, maybe_delivered: bool = False) -> bool:
        status = await self.db.run(
            lambda conn: conn.execute(
                "UPDATE gateway_jobs SET next_at = $1, lease_owner = NULL, lease_until = NULL, maybe_delivered = maybe_delivered OR $2"
                f" WHERE id = $3 AND lease_owner = $4 AND state = {D}",
                next_at,
                maybe_delivered,
                job_id,
                owner,
            )
        )
        return bool(status == "UPDATE 1")

    async def finish(self, job_id: str, owner: str, state: JobState, detail: str, attempts: list[Attempt]) -> bool:
        if state not in FINAL_STATES:
            raise ValueError(f"{state} is not a final state")
        callbacks = sum(1 for a in attempts if a.kind == AttemptKind.CALLBACK)
        return await self._held(FINISH, str(state), storable(detail, 1000), time.time(), callbacks, job_id, owner, attempts=attempts)

    async def get(self, job_id: str) -> Job | None:
        async with self.db.connection() as conn:
            return await self._get(conn, job_id)

    @staticmethod
    async def _get(conn: Any, job_id: str) -> Job | None:
        row = await conn.fetchrow("SELECT * FROM gateway_jobs WHERE id = $1", job_id)
        if row is None:
            return None
        attempts = await conn.fetch("SELECT * FROM gateway_attempts WHERE job_id = $1 ORDER BY seq", job_id)
        return readable_job_from_row(row, [stored_attempt(r["kind"], r["target"], r["started_at"], r["duration"], r["outcome"], r["detail"]) for r in attempts])

    async def list(self, filter: JobFilter | None = None, *, state: JobState | None = None, limit: int = 50) -> builtins.list[Job]:
        job_filter = filter or JobFilter(state=state, limit=limit)
        where, values = filter_where(job_filter, lambda n: f"${n}")
        sql = f"SELECT * FROM gateway_jobs{where} ORDER BY id DESC LIMIT ${len(values) + 1}"
        rows = await self.db.run(lambda conn: conn.fetch(sql, *values, job_filter.limit))
        return [readable_job_from_row(row) for row in rows]

    async def activity(self, since: float) -> Activity:
        """Three aggregate statements in one read-only transaction (repeatable read: consistent counts)."""
        async with self.db.connection() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            accepted = await conn.fetch(ACCEPTED_PER_MINUTE, since)
            finished = await conn.fetch(FINISHED_PER_MINUTE, since)
            pending = {row["state"]: row["n"] for row in await conn.fetch(f"SELECT state, count(*) AS n FROM gateway_jobs WHERE {PENDING} GROUP BY state")}
        return Activity(
            since=since,
            accepted=tuple(AcceptedCount(int(r["minute"]), r["engine"], r["category"], int(r["n"])) for r in accepted),
            finished=tuple(FinishedCount(int(r["minute"]), r["engine"], r["category"], JobState(r["state"]), int(r["bucket"]), int(r["n"])) for r in finished),
            pending={state: int(pending.get(str(state), 0)) for state in PENDING_STATES},
        )

    async def cancel(self, job_id: str, by: str) -> Job:
        return await self._act(job_id, "cancel", by)

    async def redeliver(self, job_id: str, by: str) -> Job:
        return await self._act(job_id, "redeliver", by)

    async def _act(self, job_id: str, action: Action, by: str) -> Job:
        """One transaction: lock the row (a claim skips it meanwhile; a worker's write waits, then finds
        it changed), check it, change it, record the attempt, wake the workers, read it back."""
        if not plausible_job_id(job_id):
            raise JobActionRefused(job_id, action, NO_SUCH_JOB)
        refusal: str | None = None
        job: Job | None = None
        async with self.db.connection() as conn, conn.transaction():
            now = time.time()
            row = await conn.fetchrow(
                "SELECT state, outcome IS NOT NULL AS has_outcome, lease_until, deadline FROM gateway_jobs WHERE id = $1 FOR UPDATE", job_id
            )
            state = JobState(row["state"]) if row is not None else None
            refusal = action_refusal(
                action,
                state,
                has_outcome=bool(row and row["has_outcome"]),
                lease_until=row["lease_until"] if row else None,
                deadline=row["deadline"] if row else 0.0,
                now=now,
            )
            if refusal is None:
                if action == "redeliver":
                    detail = f"re-delivery asked by {by}"
                    status = await conn.execute(REDELIVER, job_id, now)
                elif state is JobState.DELIVERING:
                    detail = f"delivery cancelled by the operator ({by})"
                    status = await conn.execute(CANCEL_DELIVERY, job_id, now, storable(detail, 1000))
                else:
                    detail = f"cancelled by {by}"
                    status = await conn.execute(CANCEL_RUN, job_id, now, outcome_json(CANCELLED), storable(detail))
                if status != "UPDATE 1":  # the row is locked and was checked: cannot happen
                    raise QueueStoreError(f"job {job_id}: {action} did not apply")
                attempt = Attempt(AttemptKind.OPERATOR, action, now, 0.0, AttemptOutcome.OK, detail)
                await conn.execute(
                    "INSERT INTO gateway_attempts (job_id, kind, target, started_at, duration, outcome, detail) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    job_id,
                    *(column[0] for column in _attempt_columns([attempt])),
                )
                if state is not JobState.DELIVERING:  # due now (cancelled to deliver its error, or re-delivered): any worker claims it at once
                    await conn.execute(f"SELECT pg_notify('{CHANNEL}', '')")
                job = await self._get(conn, job_id)
        if refusal is not None:
            raise JobActionRefused(job_id, action, refusal)
        assert job is not None
        return job

    async def prune(self, finished_before: float, limit: int) -> int:
        """Every node prunes; ``SKIP LOCKED`` keeps them off each other's rows (attempts go with their job)."""
        status = await self.db.run(
            lambda conn: conn.execute(
                "DELETE FROM gateway_jobs WHERE id IN (SELECT id FROM gateway_jobs WHERE finished_at IS NOT NULL AND finished_at < $1"
                " LIMIT $2 FOR UPDATE SKIP LOCKED)",
                finished_before,
                limit,
            )
        )
        return int(status.split()[-1])

    async def end_tenant_jobs(self, tenant: str, detail: str, *, delete: bool) -> builtins.list[Job]:
        now = time.time()
        if delete:  # attempts go with their jobs (ON DELETE CASCADE)
            rows = await self.db.run(lambda conn: conn.fetch("DELETE FROM gateway_jobs WHERE tenant = $1 RETURNING *", tenant))
        else:
            rows = await self.db.run(
                lambda conn: conn.fetch(
                    f"UPDATE gateway_jobs SET state = {DEAD}, detail = $1, finished_at = $2, lease_owner = NULL, lease_until = NULL"
                    f" WHERE tenant = $3 AND {PENDING} AND (lease_until IS NULL OR lease_until <= $2) RETURNING *",
                    storable(detail, 1000),
                    now,
                    tenant,
                )
            )
        return [readable_job_from_row(row) for row in rows]

    async def finished_since(self, since: float, *, tenant: str | None = None, limit: int = 100000) -> builtins.list[Job]:
        if tenant is None:
            rows = await self.db.run(lambda c: c.fetch("SELECT * FROM gateway_jobs WHERE finished_at >= $1 ORDER BY finished_at LIMIT $2", since, limit))
        else:
            rows = await self.db.run(
                lambda c: c.fetch("SELECT * FROM gateway_jobs WHERE finished_at >= $1 AND tenant = $2 ORDER BY finished_at LIMIT $3", since, tenant, limit)
            )
        return [readable_job_from_row(row) for row in rows]

    async def usage_totals(self, since: float, *, tenant: str | None = None) -> builtins.list[PortalUsageCount]:
        """One aggregate statement; the numbers are read from the outcome's JSON by PostgreSQL.

        The outcome is TEXT, and neither ``json`` nor ``jsonb`` can read every outcome: a result that holds
        ``\\u0000`` (a NUL in a transcript) or a lone surrogate (``\\ud800``) fails every ``json``
        operator and the ``jsonb`` cast ("unsupported Unicode escape sequence"), and one such job would fail
        the whole page. So the text is made readable first, without a migration and without changing
        what is stored: every ``\\\\`` becomes ``\\/`` (an escaped ``/``; ``replace`` pairs backslashes
        from the left, as JSON does), after which every ``\\u`` left starts an escape and loses its
        backslash. Only string contents change (the escapes become the letters ``uXXXX``): the keys and
        numbers read here are untouched, and no escape is left for the database to convert, whatever its
        encoding. Then one ``jsonb`` cast per job (each path below is a lookup in it, not another parse)."""

        def number(*path: str) -> str:
            at = "{" + ",".join(path) + "}"
            return f"CASE WHEN jsonb_typeof(o #> '{at}') = 'number' THEN (o #>> '{at}')::numeric END"

        readable = r"replace(replace(outcome, E'\\\\', E'\\/'), E'\\u', 'u')"  # E'': the same whatever standard_conforming_strings says
        # OFFSET 0 keeps the subquery apart: flattened, the planner would paste the cast into each of the nine
        # references to ``o``, and every outcome would be parsed nine times (50,000 jobs with 4 KB transcripts: 2 s as it is).
        sql = f"""
            SELECT day, engine, portal, count(*) AS jobs,
                count(*) FILTER (WHERE jsonb_path_exists(o, 'strict $.result.*', '{{}}', true) IS NOT TRUE) AS errors, -- true: an object with a member
                coalesce(sum(trunc({number("result", "usage", "prompt_tokens")})), 0)::bigint AS prompt_tokens,
                coalesce(sum(trunc({number("result", "usage", "completion_tokens")})), 0)::bigint AS completion_tokens,
                coalesce(sum({number("result", "usage", "cost_usd")}::float8), 0) AS cost_usd,
                coalesce(sum({number("result", "duration")}::float8), 0) AS audio_seconds
            FROM (
                SELECT to_char(to_timestamp(floor(finished_at)) AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day, engine, portal, ({readable})::jsonb AS o
                FROM gateway_jobs WHERE finished_at >= $1{" AND tenant = $2" if tenant is not None else ""} OFFSET 0
            ) AS finished GROUP BY day, engine, portal ORDER BY day, engine, portal"""
        params = (since,) if tenant is None else (since, tenant)
        return [PortalUsageCount(*row) for row in await self.db.run(lambda conn: conn.fetch(sql, *params))]

    async def depth(self) -> int:
        count = await self.db.run(lambda conn: conn.fetchval(f"SELECT count(*) FROM gateway_jobs WHERE {PENDING}"))
        return int(count)
