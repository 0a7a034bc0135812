"""End to end over real sockets: portal emulator -> gateway (uvicorn subprocess) -> OpenAI-compatible upstream."""

from __future__ import annotations

import time

import httpx
import pytest

from gateway.testing import API_KEY, ENGINE_TOKEN, make_config

pytestmark = pytest.mark.e2e


def test_text_request_is_answered_at_the_callback(gateway, portal, upstream):
    gw = gateway()
    url = gw.completions_url()
    assert portal.check_completions_url(url) == 200

    job_hash, body = portal.new_request(
        prompt="Say hi to Ünïcode/slashes",
        context=[{"role": "user", "content": "earlier question"}, {"role": "assistant", "content": "earlier answer"}],
        temperature=0.3,
        max_tokens=50,
        collect_context=True,
    )
    response = portal.send(url, body)
    assert response.status_code == 202
    assert response.json() == {"result": "OK"}

    job = portal.wait(job_hash, timeout=20)
    assert [(c.kind, c.body) for c in job.delivered] == [("success", {"result": "echo: Say hi to Ünïcode/slashes"})]
    sent = upstream.requests[0]
    assert sent["messages"] == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "earlier question"},
        {"role": "assistant", "content": "earlier answer"},
        {"role": "user", "content": "Say hi to Ünïcode/slashes"},
    ]
    assert sent["temperature"] == 0.3 and sent["max_tokens"] == 50 and sent["model"] == "test-model"
    assert upstream.headers[0]["authorization"] == f"Bearer {API_KEY}"

    [record] = gw.wait_final(1)
    shown = gw.cli_json("jobs", "show", record["id"])
    assert shown["state"] == "delivered"
    assert [a["kind"] for a in shown["attempts"]] == ["provider", "callback"]
    assert shown["result"]["usage"]["total_tokens"] == 10

    metrics = httpx.get(gw.url + "/metrics").text
    assert 'gateway_jobs_accepted_total{category="text",engine="acme_text"} 1.0' in metrics
    assert 'gateway_jobs_finished_total{category="text",engine="acme_text",state="delivered"} 1.0' in metrics
    assert 'gateway_delivery_attempts_total{category="text",engine="acme_text",outcome="delivered"} 1.0' in metrics
    assert "gateway_accept_latency_seconds_bucket" in metrics and "gateway_end_to_end_latency_seconds_bucket" in metrics
    assert "gateway_queue_depth 0.0" in metrics


def test_falls_back_to_the_second_target(gateway, portal, upstream):
    config = make_config(upstream.url)
    config["providers"]["down"] = {"type": "openai", "base_url": "http://127.0.0.1:9/v1", "connect_timeout": 1}
    config["engines"][0]["route"] = [{"provider": "down", "model": "m1"}, {"provider": "up", "model": "m2"}]
    gw = gateway(config)
    job_hash, body = portal.new_request(prompt="fallback please")
    assert portal.send(gw.completions_url(), body).status_code == 202
    job = portal.wait(job_hash, timeout=20)
    assert [c.body for c in job.delivered] == [{"result": "echo: fallback please"}]
    assert upstream.requests[0]["model"] == "m2"
    [record] = gw.wait_final(1)
    attempts = gw.cli_json("jobs", "show", record["id"])["attempts"]
    assert [(a["target"], a["outcome"]) for a in attempts if a["kind"] == "provider"] == [
        ("down/m1", "retryable"),
        ("down/m1", "retryable"),
        ("down/m1", "retryable"),
        ("up/m2", "ok"),
    ]


@pytest.mark.parametrize("failure", ["500", "429", "drop"])
def test_retries_then_error_callback(gateway, portal, upstream, failure):
    upstream.script(*[failure] * 3)
    gw = gateway()
    job_hash, body = portal.new_request(prompt="doomed")
    assert portal.send(gw.completions_url(), body).status_code == 202
    job = portal.wait(job_hash, timeout=20)
    [callback] = job.delivered
    assert callback.kind == "error"
    assert callback.body["code"] >= 500
    assert callback.body["api_request_completed"] is False
    assert "every route target failed" in callback.body["message"]
    assert len(upstream.requests) == 3  # one call and two retries
    [record] = gw.wait_final(1)
    assert record["state"] == "failed"


def test_final_provider_error_is_not_retried(gateway, portal, upstream):
    upstream.script("400")
    gw = gateway()
    job_hash, body = portal.new_request(prompt="too long")
    portal.send(gw.completions_url(), body)
    [callback] = portal.wait(job_hash, timeout=20).delivered
    assert callback.kind == "error" and callback.body["code"] == 400
    assert len(upstream.requests) == 1


def test_error_callback_arrives_before_a_short_ttl(gateway, portal, upstream):
    """Every target fails or hangs: the route stops early enough for the error callback to land."""
    config = make_config(upstream.url, routing={"retries": 1000, "backoff_initial": 0.2, "backoff_max": 0.5})
    upstream.delay = 30  # every call hangs far longer than the ttl
    gw = gateway(config)
    ttl = 8
    job_hash, body = portal.new_request(prompt="slow", ttl=ttl)
    url = gw.completions_url()  # a CLI run: not part of the time measured
    sent = time.time()
    portal.send(url, body)
    job = portal.wait(job_hash, timeout=ttl + 2)
    [callback] = job.delivered
    assert callback.kind == "error" and callback.body["code"] >= 500
    assert callback.at - sent < ttl


def test_portal_data_false_stops_delivery(gateway, portal, upstream):
    gw = gateway()
    job_hash, body = portal.new_request(prompt="already consumed")
    portal.jobs[job_hash].consumed = True  # e.g. the portal expired it
    portal.send(gw.completions_url(), body)
    [record] = gw.wait_final(1)
    time.sleep(0.5)
    shown = gw.cli_json("jobs", "show", record["id"])
    assert shown["state"] == "gone"
    assert shown["delivery_attempts"] == 1
    assert len(portal.jobs[job_hash].callbacks) == 1


def test_portal_errors_then_recovers(gateway, portal, upstream):
    portal.fail_next(503, 502)
    gw = gateway()
    job_hash, body = portal.new_request(prompt="persist")
    portal.send(gw.completions_url(), body)
    job = portal.wait(job_hash, timeout=20)
    assert [c.body for c in job.delivered] == [{"result": "echo: persist"}]
    [record] = gw.wait_final(1)
    shown = gw.cli_json("jobs", "show", record["id"])
    assert shown["state"] == "delivered" and shown["delivery_attempts"] == 3
    assert len(upstream.requests) == 1  # a failed callback never re-runs the model


def test_portal_down_then_up(gateway, portal, upstream):
    gw = gateway()
    url = gw.completions_url()
    job_hash, body = portal.new_request(prompt="while you were away")
    portal.server.stop()
    time.sleep(0.2)
    assert portal.send(url, body).status_code == 202
    time.sleep(1.5)  # several refused connection attempts
    portal.server.start()  # same port
    job = portal.wait(job_hash, timeout=20)
    assert [c.body for c in job.delivered] == [{"result": "echo: while you were away"}]
    assert len(job.callbacks) == 1
    assert len(upstream.requests) == 1


def test_duplicate_post_makes_one_job(gateway, portal, upstream):
    upstream.delay = 0.3
    gw = gateway()
    url = gw.completions_url()
    job_hash, body = portal.new_request(prompt="once")
    assert portal.send(url, body).status_code == 202
    assert portal.send(url, body).status_code == 202
    job = portal.wait(job_hash, timeout=20)
    assert portal.send(url, body).status_code == 202  # even after it finished
    time.sleep(0.5)
    assert len(gw.cli_json("jobs", "list")) == 1
    assert len(upstream.requests) == 1
    assert len(job.callbacks) == 1


def test_health_and_plugin_listing(gateway):
    gw = gateway()
    assert httpx.get(gw.url + "/-/health").json() == {"status": "ok", "queue_depth": 0}
    plugins = {p["name"]: p for p in httpx.get(gw.url + "/-/plugins.json").json()}
    assert plugins["openai"]["hooks"] == ["register_adapters"] and plugins["openai"]["version"] == "0.1.0"
    assert plugins["gateway.metrics"]["hooks"] == ["task_failed", "task_succeeded"]
    assert gw.cli_json("plugins") == list(plugins.values())


def test_no_secret_in_logs_or_output(gateway, portal, upstream):
    """A full run with successes and failures: tokens, keys and hashes never reach logs or CLI output."""
    upstream.script("500", "401")
    gw = gateway()
    url = gw.completions_url()
    hashes = []
    for prompt in ("one", "two"):
        job_hash, body = portal.new_request(prompt=prompt)
        hashes.append(job_hash)
        portal.send(url, body)
    bad = httpx.post(url.replace(ENGINE_TOKEN, "wrong-token-xxxxxxxxxxxxxx"), json={})
    assert bad.status_code == 404
    for job_hash in hashes:
        portal.wait(job_hash, timeout=20)
    jobs = gw.wait_final(2)
    outputs = [gw.logs(), httpx.get(gw.url + "/metrics").text, gw.cli("jobs", "list").stdout]
    outputs += [gw.cli("jobs", "show", j["id"]).stdout for j in jobs]
    outputs += [str(c.body) for h in hashes for c in portal.jobs[h].callbacks]
    for text in outputs:
        for secret in (ENGINE_TOKEN, API_KEY, *hashes):
            assert secret not in text
    assert "accepted job" in outputs[0]  # the log is not empty
