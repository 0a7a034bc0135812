"""A longer fuzzing run of the completions endpoint than the test suite affords. Run with `make fuzz`.

Starts a gateway (uvicorn subprocess), an OpenAI-compatible upstream and a portal emulator
on 127.0.0.1, sends ``--examples`` hostile requests per strategy (random bytes, random
JSON, mutated portal requests; the strategies of ``tests/strategies.py``), then checks
that the gateway still serves and delivers. Prints a table; exits 1 on any 5xx, hang or
lost normal request.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.bitrix.protocol import encode_like_php
from gateway.bitrix.simulator import PortalEmulator
from gateway.loopback import LoopbackServer
from gateway.testing import ENGINE_TOKEN, FakeOpenAI, GatewayProcess, make_config
from tests.strategies import encode, mutated_bodies, raw_bodies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=3000, help="requests per strategy (default 3000)")
    args = parser.parse_args()
    statuses: collections.Counter[int] = collections.Counter()
    failures: list[str] = []
    slowest = 0.0
    upstream, portal = FakeOpenAI(), PortalEmulator()
    with tempfile.TemporaryDirectory() as tmp, LoopbackServer(upstream.app) as up, LoopbackServer(portal.app) as portal_server:
        portal.url = portal_server.url
        gw = GatewayProcess(make_config(up.url, limits={"max_body_bytes": 65536, "default_ttl": 30}), Path(tmp)).start()
        path = f"/engines/acme_text/{ENGINE_TOKEN}/completions"
        started = time.monotonic()
        try:
            with httpx.Client(base_url=gw.url, timeout=10) as client:

                def send(raw: bytes) -> None:
                    nonlocal slowest
                    begun = time.monotonic()
                    try:
                        response = client.post(path, content=raw, headers={"Content-Type": "application/json"})
                    except httpx.HTTPError as exc:
                        failures.append(f"{type(exc).__name__} for {raw[:80]!r}")
                        return
                    slowest = max(slowest, time.monotonic() - begun)
                    statuses[response.status_code] += 1
                    if response.status_code >= 500:
                        failures.append(f"HTTP {response.status_code} for {raw[:80]!r}: {response.text[:200]}")

                fuzz = settings(max_examples=args.examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
                given(raw_bodies)(fuzz(send))()

                def send_mutated(data: st.DataObject) -> None:  # a new portal job each time: accepted ones run and deliver
                    _, valid = portal.new_request(prompt="fuzz", ttl=30)
                    send(encode(data.draw(mutated_bodies(valid))))

                given(st.data())(fuzz(send_mutated))()
                elapsed = time.monotonic() - started
                healthy = client.get("/-/health").status_code == 200
                job_hash, body = portal.new_request(prompt="still there?")
                accepted = client.post(path, content=encode_like_php(body), headers={"Content-Type": "application/json"}).status_code == 202
                delivered = accepted and bool(portal.wait(job_hash, timeout=30).delivered)
            tracebacks = gw.logs().count("Traceback")
        finally:
            gw.kill()
    rows = [
        ("requests sent", f"{sum(statuses.values()):,} in {elapsed:.1f} s"),
        ("answers by status", ", ".join(f"{code}: {count:,}" for code, count in sorted(statuses.items()))),
        ("slowest answer", f"{slowest * 1000:.1f} ms"),
        ("5xx or connection errors", str(len(failures))),
        ("tracebacks in the gateway log", str(tracebacks)),
        ("healthy afterwards / normal request delivered", f"{healthy} / {delivered}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  figure\n{'-' * width}  {'-' * 40}")
    for name, figure in rows:
        print(f"{name:<{width}}  {figure}")
    for failure in failures[:10]:
        print("  ", failure)
    return 0 if not failures and healthy and delivered and not tracebacks else 1


if __name__ == "__main__":
    sys.exit(main())
