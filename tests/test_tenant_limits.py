"""An installed portal's limits (requests per minute, jobs at once, audio minutes per day) and its
usage: per-process counting, an error callback that names the limit, metrics by tenant id."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

from gateway.bitrix.oauth_emulator import OAuthEmulator
from gateway.bitrix.simulator import PortalEmulator
from gateway.config import TenantLimits
from gateway.loopback import LoopbackServer
from gateway.tenants.limits import TenantLimiter
from gateway.tenants.model import tenant_key
from gateway.tenants.service import DOMAIN_SYNC_SECONDS
from gateway.testing import FakeOpenAI, GatewayProcess
from tests.test_app_mode import CLIENT_ID, CLIENT_SECRET, app_config, registered, wait_until


def test_requests_per_minute_slide_with_time():
    limiter = TenantLimiter(TenantLimits(requests_per_minute=2))
    assert limiter.admit("t", now=100.0) is None and limiter.admit("t", now=110.0) is None
    limit, message = limiter.admit("t", now=120.0) or ("", "")
    assert limit == "requests_per_minute" and "2 requests per minute" in message and "try again in 40 s" in message
    assert limiter.admit("other", now=120.0) is None  # each portal has its own
    assert limiter.admit("t", now=160.5) is None  # the first start left the window


def test_jobs_at_once_free_up_on_release():
    limiter = TenantLimiter(TenantLimits(concurrent_jobs=1))
    assert limiter.admit("t") is None
    assert (limiter.admit("t") or ("",))[0] == "concurrent_jobs"
    limiter.release("t")
    assert limiter.admit("t") is None


def test_audio_minutes_per_day_count_only_today():
    limiter = TenantLimiter(TenantLimits(audio_minutes_per_day=1))
    day = 86400.0 * 20000
    assert limiter.admit("t", audio=True, now=day + 10) is None
    limiter.release("t")
    limiter.record_audio("t", 61, now=day + 20)
    assert (limiter.admit("t", audio=True, now=day + 30) or ("",))[0] == "audio_minutes_per_day"
    assert limiter.admit("t", audio=False, now=day + 30) is None  # text is not audio
    limiter.release("t")
    assert limiter.admit("t", audio=True, now=day + 86400 + 1) is None  # a new UTC day


def test_a_portal_over_its_limit_gets_an_error_callback_and_usage_is_counted_by_tenant(tmp_path: Path) -> None:
    oauth, portal, upstream = OAuthEmulator(CLIENT_ID, CLIENT_SECRET), PortalEmulator(), FakeOpenAI()
    with LoopbackServer(oauth.app) as o, LoopbackServer(portal.app) as p, LoopbackServer(upstream.app) as up:
        oauth.url, portal.url = o.url, p.url
        config = app_config(up.url)
        config["app"]["limits"] = {"requests_per_minute": 1}
        gw = GatewayProcess(config, tmp_path).start()
        try:
            portal.install(oauth, gw.cli_json("app", "info")["install_url"])
            url = wait_until(lambda: registered(portal), "engine registered", gw)[0]["completions_url"]
            first, body = portal.new_request(auth=portal.app_auth())
            assert portal.send(url, body).status_code == 202
            assert portal.wait(first).delivered[0].kind == "success"
            second, body = portal.new_request(auth=portal.app_auth())
            assert portal.send(url, body).status_code == 202  # accepted, then answered with the reason
            callback = portal.wait(second).delivered[0]
            assert callback.kind == "error", gw.logs()[-2000:]
            assert "limit of 1 requests per minute" in str(callback.body)

            key = tenant_key(portal.member_id)
            metrics = httpx.get(gw.url + "/metrics").text
            assert f'gateway_tenant_limited_total{{limit="requests_per_minute",tenant="{key}"}} 1.0' in metrics
            assert f'gateway_tenant_tasks_total{{outcome="result",tenant="{key}"}} 1.0' in metrics
            assert portal.member_id not in metrics  # the label is a hash, never the portal's id

            gw.wait_final(2)
            rows = gw.cli_json("usage", "--tenant", portal.domain)
            assert [(r["engine"], r["jobs"], r["results"]) for r in rows] == [("acme_text", 2, 1)]
            assert rows[0]["prompt_tokens"] > 0
            missing = gw.cli("usage", "--tenant", "nope.example.com", check=False)
            assert missing.returncode == 1 and "no tenant 'nope.example.com'" in missing.stderr
        finally:
            gw.stop()


def test_a_tenants_own_limits_override_the_defaults():
    limiter = TenantLimiter(TenantLimits(requests_per_minute=100, concurrent_jobs=2))
    limiter.set_overrides({"small": {"requests_per_minute": 1}, "free": {"concurrent_jobs": 0}})
    assert limiter.limits_for("small") == TenantLimits(requests_per_minute=1, concurrent_jobs=2)
    assert limiter.limits_for("free") == TenantLimits(requests_per_minute=100, concurrent_jobs=None)  # 0: no limit
    assert limiter.limits_for("other") == TenantLimits(requests_per_minute=100, concurrent_jobs=2)
    assert limiter.admit("small", now=10.0) is None
    assert (limiter.admit("small", now=11.0) or ("",))[0] == "requests_per_minute"


def test_an_operator_sets_one_portals_limit_and_every_process_applies_it(tmp_path: Path) -> None:
    oauth, portal, upstream = OAuthEmulator(CLIENT_ID, CLIENT_SECRET), PortalEmulator(), FakeOpenAI()
    with LoopbackServer(oauth.app) as o, LoopbackServer(portal.app) as p, LoopbackServer(upstream.app) as up:
        oauth.url, portal.url = o.url, p.url
        gw = GatewayProcess(app_config(up.url), tmp_path).start()
        try:
            portal.install(oauth, gw.cli_json("app", "info")["install_url"])
            url = wait_until(lambda: registered(portal), "engine registered", gw)[0]["completions_url"]
            shown = json.loads(gw.cli("tenants", "limits", portal.domain, "--requests-per-minute", "1").stdout)
            assert shown["own"] == {"requests_per_minute": 1} and shown["effective"]["requests_per_minute"] == 1
            time.sleep(2 * DOMAIN_SYNC_SECONDS + 1)  # the serving process reads every tenant's limits every 5 s (plus its own lag)
            kinds = []
            for _ in range(2):
                job_hash, body = portal.new_request(auth=portal.app_auth())
                assert portal.send(url, body).status_code == 202
                kinds.append(portal.wait(job_hash).delivered[0].kind)
            assert kinds == ["success", "error"], gw.logs()[-2000:]
            assert portal.reinstall()[1] == 200  # new tokens; the operator's limit stays
            assert gw.cli_json("tenants", "show", portal.member_id)["limits"] == {"requests_per_minute": 1}
            reset = json.loads(gw.cli("tenants", "limits", portal.domain, "--reset").stdout)
            assert reset["own"] == {} and reset["effective"]["requests_per_minute"] is None
        finally:
            gw.stop()
