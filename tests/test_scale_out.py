"""Scale-out end to end: several gateway processes on one PostgreSQL database, nothing else shared.

Every node is a real ``gateway serve`` (or ``gateway worker``) subprocess with its own folder and
``data_dir``; the portal emulator, the upstream stub and PostgreSQL (the session's throw-away
cluster, a fresh database per test) serve real sockets on 127.0.0.1. Every wait is bounded and
fails with the nodes' logs.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.bitrix.simulator import PortalEmulator
from gateway.engines import TOKENS_FILE
from gateway.postgres.schema import LATEST, MIGRATIONS
from gateway.testing import ENGINE_TOKEN, GatewayProcess, make_config
from gateway.testing.postgres import PostgresServer
from gateway.testing.upstream import FakeOpenAI

pytestmark = pytest.mark.e2e

SHARED_URL = "https://gateway.example.test"
"""The one public URL of nodes behind a load balancer."""
DELIVERED = {"delivered", "delivered_unconfirmed"}
"""``delivered_unconfirmed``: a callback cut off by a crash was taken by the portal; its repeat got ``data:false``."""


def postgres_config(upstream_url: str, dsn: str, **queue: Any) -> dict[str, Any]:
    """:func:`make_config` on the shared database: leases of 2 s, a poll of 0.5 s (the safety net
    that finds expired leases), small pools (many processes share one test cluster)."""
    return make_config(upstream_url, queue={"backend": "postgres", "dsn": dsn, "lease_seconds": 2, "poll_interval": 0.5, "pool_size": 4, **queue})


def log_tails(processes: list[GatewayProcess], lines: int = 40) -> str:
    return "\n".join(f"--- node {i} ({p.url}) log tail:\n" + "\n".join(p.logs().splitlines()[-lines:]) for i, p in enumerate(processes))


class Cluster:
    """Gateway processes on one database, each in its own folder; all killed at the end of the test."""

    def __init__(self, tmp_path: Path, upstream: FakeOpenAI, dsn: str) -> None:
        self.tmp_path, self.upstream, self.dsn = tmp_path, upstream, dsn
        self.nodes: list[GatewayProcess] = []
        self.others: list[subprocess.Popen[bytes]] = []

    def config(self, **queue: Any) -> dict[str, Any]:
        return postgres_config(self.upstream.url, self.dsn, **queue)

    def node(self, config: dict[str, Any] | None = None, *, public_url: str | None = None) -> GatewayProcess:
        """A node's process, not started: its own folder, so its own ``data_dir``."""
        workdir = self.tmp_path / f"node{len(self.nodes)}"
        workdir.mkdir()
        process = GatewayProcess(config or self.config(), workdir, public_url=public_url)
        self.nodes.append(process)
        return process

    def start(self, count: int, config: dict[str, Any] | None = None, *, public_url: str | None = None, args: tuple[str, ...] = ()) -> list[GatewayProcess]:
        """``count`` nodes started at the same moment (their migrations and token generation race)."""
        nodes = [self.node(config, public_url=public_url) for _ in range(count)]
        with ThreadPoolExecutor(count) as pool:
            list(pool.map(lambda n: n.start(*args, timeout=60), nodes))
        return nodes

    def popen(self, node: GatewayProcess, *args: str) -> subprocess.Popen[bytes]:
        process = node.popen(*args)
        self.others.append(process)
        return process

    def logs(self) -> str:
        return log_tails(self.nodes)

    def close(self) -> None:
        for node in self.nodes:
            node.kill()
        for process in self.others:
            if process.poll() is None:
                process.kill()
                process.wait(10)


@pytest.fixture
def cluster(tmp_path: Path, upstream: FakeOpenAI, postgres_dsn: str) -> Iterator[Cluster]:
    nodes = Cluster(tmp_path, upstream, postgres_dsn)
    yield nodes
    nodes.close()  # before postgres_dsn drops the database


def wait_until(check: Callable[[], bool], timeout: float, what: str, cluster: Cluster) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s\n{cluster.logs()}")
        time.sleep(0.05)


def wait_delivered(portal: PortalEmulator, hashes: list[str], timeout: float, cluster: Cluster) -> None:
    """Every hash has a callback the portal took (``data:true``)."""

    def missing() -> list[str]:
        return [h for h in hashes if not portal.jobs[h].consumed]

    deadline = time.monotonic() + timeout
    while left := missing():
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(left)} of {len(hashes)} request(s) not delivered within {timeout:g} s\n{cluster.logs()}")
        time.sleep(0.05)


def engine_path(code: str = "acme_text", token: str = ENGINE_TOKEN) -> str:
    return f"/engines/{code}/{token}/completions"


def jobs_of(node: GatewayProcess) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = node.cli_json("jobs", "list", "--limit", "1000")
    return jobs


def wait_final_on(node: GatewayProcess, count: int, timeout: float, cluster: Cluster) -> list[dict[str, Any]]:
    """The jobs as ``node``'s ``jobs list`` shows them, once ``count`` are in a final state."""
    jobs = node.wait_final(count, timeout=timeout)
    final = [j for j in jobs if j["finished_at"] != "-"]
    assert len(final) >= count, f"{len(final)} of {count} jobs final on {node.url}: {[j['state'] for j in jobs]}\n{cluster.logs()}"
    return jobs


def accepted_ids(node: GatewayProcess) -> set[str]:
    return set(re.findall(r"accepted job (\S+) engine=", node.logs()))


def finished_ids(node: GatewayProcess) -> set[str]:
    return set(re.findall(r"job (\S+) engine=\S+ final=", node.logs()))


def test_three_nodes_share_tokens_and_jobs(cluster: Cluster, portal: PortalEmulator, postgres_server: PostgresServer) -> None:
    """Started at once on an empty database, three nodes migrate it once and generate one token:
    every node prints the same completions URLs, and every node lists every job."""
    config = cluster.config()
    del config["engines"][0]["token"]  # generated, stored in the database
    nodes = cluster.start(3, config, public_url=SHARED_URL)

    with ThreadPoolExecutor(3) as pool:
        listings = list(pool.map(lambda n: n.cli_json("engines", "list"), nodes))
    assert listings[0] == listings[1] == listings[2], f"the nodes print different engines: {listings}"
    [engine] = listings[0]
    url = engine["completions_url"]
    assert url.startswith(f"{SHARED_URL}/engines/acme_text/") and url.endswith("/completions") and ENGINE_TOKEN not in url
    token = url.split("/")[-2]
    database = cluster.dsn.rsplit("/", 1)[1]
    assert postgres_server.psql(database, "SELECT count(*) FROM gateway_engine_tokens").strip() == "1"
    applied = postgres_server.psql(database, "SELECT version FROM gateway_migrations ORDER BY version").split()
    assert applied == [str(m.version) for m in MIGRATIONS]  # each applied once
    for node in nodes:
        assert not (Path(node.config["data_dir"]) / TOKENS_FILE).exists()  # nothing of it in a node's data_dir

    hashes = []
    for i, node in enumerate(nodes):  # each node takes one request at the shared token
        job_hash, body = portal.new_request(prompt=f"node {i}")
        assert portal.send(node.url + engine_path(token=token), body).status_code == 202
        hashes.append(job_hash)
    wait_delivered(portal, hashes, 20, cluster)
    for i, job_hash in enumerate(hashes):
        assert [c.body for c in portal.jobs[job_hash].delivered] == [{"result": f"echo: node {i}"}]

    wait_final_on(nodes[0], 3, 20, cluster)
    with ThreadPoolExecutor(3) as pool:
        seen = list(pool.map(jobs_of, nodes))
    ids = [sorted(j["id"] for j in jobs) for jobs in seen]
    assert len(ids[0]) == 3 and ids[0] == ids[1] == ids[2], f"the nodes list different jobs: {ids}"
    assert all(j["state"] == "delivered" for jobs in seen for j in jobs)
    assert sorted(accepted_ids(nodes[0]) | accepted_ids(nodes[1]) | accepted_ids(nodes[2])) == ids[0]


def test_a_repeat_sent_to_another_node_makes_no_second_job(cluster: Cluster, portal: PortalEmulator, upstream: FakeOpenAI) -> None:
    upstream.delay = 0.5  # the repeat arrives while the first node runs the job
    a, b = cluster.start(2)
    job_hash, body = portal.new_request(prompt="once across the cluster")
    first = portal.send(a.url + engine_path(), body)
    second = portal.send(b.url + engine_path(), body)
    assert (first.status_code, second.status_code) == (202, 202), (first.text, second.text)
    wait_delivered(portal, [job_hash], 20, cluster)
    assert portal.send(b.url + engine_path(), body).status_code == 202  # even after it finished
    [job] = wait_final_on(b, 1, 20, cluster)
    assert job["state"] == "delivered"
    time.sleep(1.0)  # room for a wrong second job to run and call back
    assert len(jobs_of(a)) == 1
    assert len(upstream.requests) == 1
    assert [(c.kind, c.body) for c in portal.jobs[job_hash].callbacks] == [("success", {"result": "echo: once across the cluster"})]
    assert "repeated request for job" in b.logs()


def test_requests_spread_over_three_nodes_are_each_delivered_once(cluster: Cluster, portal: PortalEmulator, upstream: FakeOpenAI) -> None:
    upstream.delay = 0.05
    nodes = cluster.start(3)
    hashes = []
    for i in range(30):
        job_hash, body = portal.new_request(prompt=f"spread {i}")
        response = portal.send(nodes[i % 3].url + engine_path(), body)
        assert response.status_code == 202, response.text
        hashes.append(job_hash)
    wait_delivered(portal, hashes, 30, cluster)
    for i, job_hash in enumerate(hashes):
        assert [(c.kind, c.body) for c in portal.jobs[job_hash].callbacks] == [("success", {"result": f"echo: spread {i}"})], f"request {i}"
    jobs = wait_final_on(nodes[2], 30, 30, cluster)
    assert len(jobs) == 30 and {j["state"] for j in jobs} == {"delivered"}
    assert len(upstream.requests) == 30
    finished = [finished_ids(node) for node in nodes]
    assert all(finished), f"a node finished no job: {[len(f) for f in finished]}\n{cluster.logs()}"
    assert sorted(finished[0] | finished[1] | finished[2]) == sorted(j["id"] for j in jobs)
    assert sum(len(f) for f in finished) == 30  # no job finished twice


def image_engine_config(cluster: Cluster) -> dict[str, Any]:
    config = cluster.config()
    config["engines"] = [
        {
            "code": "acme_image",
            "name": "ACME pictures",
            "category": "image",
            "token": "img-token-0123456789abcdef",
            "route": [{"provider": "up", "model": "dall-e-3"}],
            "image": {"max_images": 2},
        }
    ]
    return config


def test_an_image_hosted_by_one_node_is_served_by_another(cluster: Cluster, portal: PortalEmulator, upstream: FakeOpenAI) -> None:
    a, b = cluster.start(2, image_engine_config(cluster))
    job_hash, body = portal.new_request(
        category="image", prompt={"prompt": "a lighthouse", "style": None, "format": None, "images_number": 2}, payload_provider="styledpicture"
    )
    assert portal.send(a.url + engine_path("acme_image", "img-token-0123456789abcdef"), body).status_code == 202
    wait_delivered(portal, [job_hash], 20, cluster)
    [callback] = portal.jobs[job_hash].delivered
    assert callback.kind == "success", callback.body
    urls = callback.body["result"]
    assert len(urls) == 2 and all(u.startswith(a.url + "/files/") and u.endswith(".png") for u in urls), urls
    for url, original in zip(urls, upstream.pictures, strict=True):
        path = url.removeprefix(a.url)
        served = httpx.get(b.url + path, timeout=10)  # the other node, which never saw the job
        assert served.status_code == 200, served.text
        assert served.headers["content-type"] == "image/png"
        assert served.content == original
        assert httpx.get(a.url + path, timeout=10).content == original
    assert httpx.get(b.url + "/files/" + "a" * 32 + ".png", timeout=10).status_code == 404
    for node in (a, b):  # the files live in the database, not in a node's data_dir
        files = Path(node.config["data_dir"]) / "files"
        assert not files.exists() or not any(files.iterdir()), list(files.iterdir())


def test_a_node_killed_with_jobs_in_flight_loses_none(cluster: Cluster, portal: PortalEmulator, upstream: FakeOpenAI) -> None:
    """SIGKILL of the node running the jobs: the others take them over once the 2 s lease runs out."""
    upstream.delay = 1.5
    a, b, c = cluster.start(3)
    hashes = []
    for i in range(6):
        job_hash, body = portal.new_request(prompt=f"in flight {i}")
        assert portal.send(a.url + engine_path(), body).status_code == 202
        hashes.append(job_hash)
    wait_until(lambda: len(upstream.requests) >= 6, 10, "node A calls the upstream for its 6 jobs", cluster)
    a.kill()
    orphaned = [h for h in hashes if not portal.jobs[h].callbacks]
    assert orphaned, "every job finished before the kill: nothing was in flight"
    upstream.delay = 0.1
    wait_delivered(portal, hashes, 30, cluster)
    for i, job_hash in enumerate(hashes):
        delivered = portal.jobs[job_hash].delivered
        assert [c.body for c in delivered] == [{"result": f"echo: in flight {i}"}], f"request {i}: {portal.jobs[job_hash].callbacks}"

    taken_over = accepted_ids(a)
    assert len(taken_over) == 6
    jobs = wait_final_on(b, 6, 20, cluster)
    assert {j["id"] for j in jobs} == taken_over
    assert {j["state"] for j in jobs} <= DELIVERED, [j["state"] for j in jobs]
    finished_elsewhere = (finished_ids(b) | finished_ids(c)) & taken_over
    assert len(finished_elsewhere) >= len(orphaned), f"{len(finished_elsewhere)} finished by B or C, {len(orphaned)} orphaned\n{cluster.logs()}"


def test_a_worker_is_woken_by_notify_not_by_the_poll(cluster: Cluster, portal: PortalEmulator) -> None:
    """``serve --no-worker`` accepts, a separate ``gateway worker`` runs the job: with a poll of
    30 s, only the notification can make the callback arrive within seconds."""
    [front] = cluster.start(1, cluster.config(poll_interval=30), args=("--no-worker",))
    worker = cluster.popen(front, "worker", "--log-level", "DEBUG")
    wait_until(lambda: "processing jobs from" in front.logs() or worker.poll() is not None, 30, "the worker starts", cluster)
    assert worker.poll() is None, f"gateway worker exited with {worker.returncode}\n{cluster.logs()}"
    time.sleep(1.0)  # the worker's first claim and its listener's first wake-up are over

    for prompt in ("first", "second"):
        job_hash, body = portal.new_request(prompt=prompt)
        sent = time.monotonic()
        assert portal.send(front.url + engine_path(), body).status_code == 202
        job = portal.wait(job_hash, timeout=10)
        took = time.monotonic() - sent
        assert job.consumed, f"the {prompt} job was not delivered within 10 s (the poll is 30 s)\n{cluster.logs()}"
        assert [c.body for c in job.delivered] == [{"result": f"echo: {prompt}"}]
        assert took < 10
        time.sleep(0.5)
    jobs = jobs_of(front)
    assert len(jobs) == 2 and {j["state"] for j in jobs} == {"delivered"}


def test_postgres_restart_under_load(cluster: Cluster, portal: PortalEmulator, postgres_server: PostgresServer) -> None:
    """PostgreSQL stops for ~3 s while requests keep coming: 503 while it is down, every 202
    delivered exactly once after, and the nodes recover without a restart."""
    nodes = cluster.start(2, cluster.config(connect_timeout=2))
    total = 150
    results: list[tuple[str, int]] = []
    failures: list[str] = []
    forty_sent = threading.Event()

    def send_all() -> None:
        for i in range(total):
            job_hash, body = portal.new_request(prompt=f"under load {i}")
            try:
                results.append((job_hash, portal.send(nodes[i % 2].url + engine_path(), body, timeout=30).status_code))
            except httpx.HTTPError as exc:
                failures.append(f"request {i}: {type(exc).__name__}: {exc}")
            finally:
                if i == 40:
                    forty_sent.set()
            time.sleep(0.06)

    sender = threading.Thread(target=send_all, daemon=True)
    try:
        sender.start()
        assert forty_sent.wait(30), f"41 requests were not sent within 30 s\n{cluster.logs()}"
        postgres_server.stop()
        time.sleep(3.0)
        postgres_server.start()
        sender.join(60)
        assert not sender.is_alive(), f"the sender did not finish within 60 s\n{cluster.logs()}"
    finally:
        if not postgres_server.running():
            postgres_server.start()

    assert not failures, f"connection errors: {failures[:5]}\n{cluster.logs()}"
    statuses = [status for _, status in results]
    assert len(statuses) == total
    assert set(statuses) <= {202, 503}, sorted(set(statuses))
    assert statuses.count(503) >= 1, "no request was refused while PostgreSQL was down"
    shape = "".join("." if status == 202 else "X" if status == 503 else "?" for status in statuses)  # . 202, X 503
    assert shape.startswith("." * 41) and shape.endswith("." * 20), f"202 before the stop and again after the start: {shape}\n{cluster.logs()}"
    accepted = [h for h, status in results if status == 202]

    wait_delivered(portal, accepted, 60, cluster)
    for job_hash in accepted:
        assert len(portal.jobs[job_hash].delivered) == 1, portal.jobs[job_hash].callbacks
    for node in nodes:
        assert node.proc is not None and node.proc.poll() is None, f"{node.url} exited\n{cluster.logs()}"

        def healthy(url: str = node.url + "/-/health") -> bool:
            return httpx.get(url, timeout=10).status_code == 200

        wait_until(healthy, 30, f"{node.url}/-/health answers 200", cluster)
    # Nothing half-stored: each stored job is a request the portal got its answer for.
    with_callback = {h for h, _ in results if portal.jobs[h].delivered}
    jobs = wait_final_on(nodes[1], len(with_callback), 30, cluster)
    assert len(jobs) == len(with_callback) and set(accepted) <= with_callback
    assert {j["state"] for j in jobs} <= DELIVERED, sorted(j["state"] for j in jobs)


def test_db_migrate_and_status(tmp_path: Path, upstream: FakeOpenAI, postgres_dsn: str) -> None:
    node = GatewayProcess(postgres_config(upstream.url, postgres_dsn), tmp_path)  # never started: the CLI alone
    before = node.cli("db", "status")
    assert f"0 of {LATEST} migration(s) applied" in before.stdout and "0001  pending" in before.stdout and "gateway db migrate" in before.stdout
    migrated = node.cli("db", "migrate")
    assert "applied 0001 jobs, attempts, engine tokens and hosted files" in migrated.stdout and "applied 0002 app mode" in migrated.stdout
    assert all(f"applied {m.version:04d} {m.name}" in migrated.stdout for m in MIGRATIONS)
    assert f"schema at version {LATEST}" in migrated.stdout
    assert "nothing to apply" in node.cli("db", "migrate").stdout
    status = node.cli_json("db", "status")
    assert (status["latest"], status["pending"]) == (LATEST, 0)
    assert [(m["version"], m["applied_at"] is not None) for m in status["migrations"]] == [(m.version, True) for m in MIGRATIONS]
    assert postgres_dsn not in before.stdout + migrated.stdout

    sqlite_dir = tmp_path / "sqlite"
    sqlite_dir.mkdir()
    sqlite_node = GatewayProcess(make_config(upstream.url), sqlite_dir)
    refused = sqlite_node.cli("db", "status", check=False)
    assert refused.returncode == 2, refused
    assert "configuration error" in refused.stderr and "queue.backend" in refused.stderr and "PostgreSQL" in refused.stderr
