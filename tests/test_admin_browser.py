"""The admin dashboard in a real browser (Debian's Chromium through Playwright; tests/browser.py):
what an operator does, over real sockets, against the page contract (docs: issue 18).

Portal emulator -> gateway (subprocess, ``admin:`` configured) -> upstream stubs; the browser reads the
dashboard; the figures it shows are compared with ``/metrics``, the CLI and the emulator. Every page is
saved to build/screenshots/ (``make screenshots`` copies two of them to docs/screenshots/ for the README).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page, Response, expect
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.bitrix.oauth_emulator import OAuthEmulator
from gateway.bitrix.simulator import PortalEmulator
from gateway.loopback import LoopbackServer
from gateway.testing import API_KEY, ENGINE_TOKEN, FakeOpenAI, GatewayProcess, make_config
from gateway.testing.proxy import PrefixProxy
from tests.browser import Tab, chromium_fixture, tab_fixture  # noqa: F401  (the fixtures `chromium` and `tab`)
from tests.test_app_mode import CLIENT_ID, CLIENT_SECRET, app_config, installed

pytestmark = pytest.mark.e2e
PASSWORD = "correct-horse-battery-staple"
XSS = "<script>alert(1)</script>"
XSS_TOKEN = "tok-XSS-0123456789abcdef0123"
LIVE_MS = 15_000  # the overview refreshes every 5 s: three chances


# -- the gateway under test ------------------------------------------------------------------


@pytest.fixture
def hostile_upstream() -> Iterator[str]:
    """An OpenAI-compatible server that refuses every request with markup in its error text."""

    async def refuse(request: Request) -> JSONResponse:
        return JSONResponse({"error": {"message": f"{XSS} model overloaded", "type": "test"}}, 400)

    with LoopbackServer(Starlette(routes=[Route("/v1/chat/completions", refuse, methods=["POST"])])) as server:
        yield server.url


def dashboard_config(upstream_url: str, hostile_url: str) -> dict[str, Any]:
    """The test config with the dashboard on and a second engine whose name and upstream error carry markup."""
    config = make_config(upstream_url, admin={"password": PASSWORD})
    config["providers"]["hostile"] = {"type": "openai", "base_url": hostile_url + "/v1", "api_key": "sk-hostile-0123456789", "timeout": 30}
    config["engines"].append(
        {"code": "xss_text", "name": f"{XSS} engine", "category": "text", "token": XSS_TOKEN, "route": [{"provider": "hostile", "model": "m"}]}
    )
    return config


def send(gw: GatewayProcess, portal: PortalEmulator, code: str = "acme_text", prompt: str = "hello") -> str:
    """One request from the portal, answered at its callback; the job's hash (the callback URL's secret)."""
    job_hash, body = portal.new_request(prompt=prompt)
    answer = portal.send(gw.completions_url(code), body)
    assert answer.status_code == 202, answer.text
    assert portal.wait(job_hash, timeout=20).delivered, gw.logs()[-3000:]
    return job_hash


def metrics(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """``/metrics`` as sample name -> [(labels, value)]."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> int:
    return int(sum(value for found, value in samples.get(name, []) if all(found.get(k) == v for k, v in labels.items())))


# -- what the browser does -------------------------------------------------------------------


def log_in(tab: Tab, site: str, *, wrong_first: bool = False) -> None:
    """Open ``site``/admin/ logged out, land on the login form, log in, arrive at the overview.
    ``wrong_first``: a wrong password before, answered 401 with the error on the form."""
    page = tab.page
    page.goto(site + "/admin/")
    expect(page).to_have_url(re.compile(re.escape(site + "/admin/login?next=")))
    if wrong_first:
        tab.shot("login")
        tab.allow_status(401)
        assert submit_login(page, "not-the-password-at-all").status == 401
        expect(page.locator(".flash.error")).to_have_text("Wrong user name or password.")
        expect(page.locator("nav")).to_have_count(0)  # not logged in
    assert submit_login(page, PASSWORD).status == 303
    expect(page).to_have_url(site + "/admin/")
    expect(page.locator("nav a[data-nav=overview]")).to_be_visible()


def submit_login(page: Page, password: str, user: str = "admin") -> Response:
    """Fill and send the login form on the current page; the answer to the POST."""
    page.fill("form#login input[name=username]", user)
    page.fill("form#login input[name=password]", password)
    with page.expect_response(lambda r: r.request.method == "POST" and "/admin/login" in r.url) as answer:
        page.click("form#login button[type=submit]")
    page.wait_for_load_state()
    return answer.value


def number(page: Page, selector: str) -> int:
    return int(page.locator(selector).inner_text().strip())


def filter_jobs(page: Page, **choices: str) -> list[str]:
    """Choose filters in form#job-filters, submit, and return the job ids listed."""
    for name, value in choices.items():
        page.select_option(f"form#job-filters select[name={name}]", value)
    with page.expect_navigation():
        page.click("form#job-filters button")
    for name, value in choices.items():
        assert f"{name}={value}" in page.url
    return [row.get_attribute("data-job-id") or "" for row in page.locator("table#jobs tbody tr[data-job-id]").all()]


# -- the tests -------------------------------------------------------------------------------


def test_log_in_watch_the_overview_match_metrics_and_find_why_a_job_failed(
    tab: Tab, gateway: Callable[..., GatewayProcess], portal: PortalEmulator, upstream: FakeOpenAI, hostile_upstream: str
) -> None:
    gw = gateway(dashboard_config(upstream.url, hostile_upstream))
    page = tab.page
    log_in(tab, gw.url, wrong_first=True)
    expect(page.locator("[data-testid=totals] [data-metric=accepted]")).to_have_text("0")
    page.evaluate("window.stillTheSamePage = true")

    for i in range(3):
        send(gw, portal, prompt=f"hello {i}")
    upstream.script("500", "500", "500")  # one call and two retries: the job fails
    doomed_hash = send(gw, portal, prompt="doomed")
    jobs = gw.wait_final(4)
    failed_id = next(j["id"] for j in jobs if j["state"] == "failed")

    # the live part catches up without a reload, and says what /metrics says
    totals = "[data-testid=totals] "
    expect(page.locator(totals + "[data-metric=accepted]")).to_have_text("4", timeout=LIVE_MS)
    expect(page.locator(totals + "[data-metric=failed]")).to_have_text("1", timeout=LIVE_MS)
    assert page.evaluate("window.stillTheSamePage") is True, "the overview reloaded instead of refreshing its live part"
    seen = metrics(gw.url)
    accepted = total(seen, "gateway_jobs_accepted_total")
    by_state = {state: total(seen, "gateway_jobs_finished_total", state=state) for state in ("delivered", "failed", "expired")}
    assert (accepted, by_state) == (4, {"delivered": 3, "failed": 1, "expired": 0})
    assert number(page, totals + "[data-metric=accepted]") == accepted
    assert number(page, totals + "[data-metric=succeeded]") == by_state["delivered"]
    assert number(page, totals + "[data-metric=failed]") == by_state["failed"]
    assert number(page, totals + "[data-metric=expired]") == by_state["expired"]
    process = "[data-testid=process-metrics] "
    assert number(page, process + "[data-metric=accepted_total]") == accepted
    assert number(page, process + "[data-metric=finished_total]") == total(seen, "gateway_jobs_finished_total") == 4
    assert number(page, "[data-testid=queue-depth]") == total(seen, "gateway_queue_depth") == 0
    acme = "table#engine-table tr[data-engine=acme_text][data-category=text] "
    assert (
        [number(page, acme + f"td[data-col={col}]") for col in ("accepted", "succeeded", "failed", "expired")]
        == [
            total(seen, "gateway_jobs_accepted_total", engine="acme_text"),
            total(seen, "gateway_jobs_finished_total", engine="acme_text", state="delivered"),
            total(seen, "gateway_jobs_finished_total", engine="acme_text", state="failed"),
            0,
        ]
        == [4, 3, 1, 0]
    )
    loops = page.locator("table#loops tr[data-loop] td[data-col=status]").all_inner_texts()
    assert loops and all(status.strip() == "running" for status in loops), loops
    expect(page.locator("svg#activity-chart")).to_be_visible()
    tab.shot("overview")

    # a job of the engine whose name and upstream error carry markup (after the overview's picture: it is in the README)
    hostile_hash = send(gw, portal, "xss_text", prompt="hostile")
    jobs = gw.wait_final(5)
    hostile_id = next(j["id"] for j in jobs if j["engine"] == "xss_text")

    # why did it fail: two clicks from the overview (Jobs, then the job)
    page.click("nav a[data-nav=jobs]")
    expect(page.locator("table#jobs tbody tr[data-job-id]")).to_have_count(5)
    row = page.locator(f"table#jobs tbody tr[data-job-id='{failed_id}']")
    expect(row.locator("td[data-col=state]")).to_have_text("failed")
    expect(row.locator("td[data-col=engine]")).to_have_text("acme_text")
    tab.shot("jobs")
    row.locator("a.job-link").click()
    expect(page).to_have_url(f"{gw.url}/admin/jobs/{failed_id}")
    expect(page.locator("[data-testid=job-state]")).to_have_text("failed")
    expect(page.locator("[data-testid=job-error]")).to_contain_text("scripted failure 500")
    provider = page.locator("ol#timeline li[data-kind=provider]")
    expect(provider).to_have_count(3)
    for i in range(3):
        expect(provider.nth(i).locator("[data-col=target]")).to_have_text("up/test-model")
        expect(provider.nth(i).locator("[data-col=outcome]")).to_have_text("retryable")
        expect(provider.nth(i).locator("[data-col=detail]")).to_have_text("up: HTTP 500: scripted failure 500")
    expect(page.locator("ol#timeline li[data-kind=callback] [data-col=outcome]")).to_have_text("delivered")
    html = page.content()
    leaked = [name for name, secret in (("callback hash", doomed_hash), ("engine token", ENGINE_TOKEN), ("provider key", API_KEY)) if secret in html]
    assert not leaked, f"the job page shows secrets: {leaked}"
    tab.shot("job")

    # filters: by state, then state and engine
    page.click("nav a[data-nav=jobs]")
    failed = filter_jobs(page, state="failed")
    assert sorted(failed) == sorted([failed_id, hostile_id])
    assert filter_jobs(page, state="failed", engine="acme_text") == [failed_id]
    assert sorted(filter_jobs(page, state="delivered", engine="acme_text")) == sorted(j["id"] for j in jobs if j["state"] == "delivered")
    assert filter_jobs(page, state="delivered", engine="xss_text") == []
    expect(page.locator("table#jobs tbody")).to_contain_text("no jobs")

    # markup from an upstream's error text is shown as text, never run (a dialog fails the test in tab's teardown)
    assert filter_jobs(page, state="failed", engine="xss_text") == [hostile_id]
    page.locator(f"tr[data-job-id='{hostile_id}'] a.job-link").click()
    expect(page.locator("ol#timeline li[data-kind=provider] [data-col=detail]")).to_have_text(f"hostile: HTTP 400: {XSS} model overloaded")
    expect(page.locator("[data-testid=job-error]")).to_contain_text(XSS)
    assert page.locator("body script").count() == 0, "markup from the upstream became a script element"
    assert hostile_hash not in page.content() and XSS_TOKEN not in page.content()


def test_reveal_and_copy_an_engine_url_and_read_usage_plugins_and_csrf(
    tab: Tab, gateway: Callable[..., GatewayProcess], portal: PortalEmulator, upstream: FakeOpenAI, hostile_upstream: str
) -> None:
    gw = gateway(dashboard_config(upstream.url, hostile_upstream))
    for i in range(2):
        send(gw, portal, prompt=f"hello {i}")
    send(gw, portal, "xss_text")
    gw.wait_final(3)
    page = tab.page
    log_in(tab, gw.url)

    # engines: the URL is masked until revealed, fetched on click, copied to the clipboard
    page.click("nav a[data-nav=engines]")
    url = gw.completions_url()
    assert url == next(e["completions_url"] for e in gw.cli_json("engines", "list") if e["code"] == "acme_text")
    row = page.locator("table#engines tr[data-engine=acme_text]")
    expect(row.locator("td[data-col=category]")).to_have_text("text")
    expect(row.locator("td[data-col=route]")).to_contain_text("up/test-model")
    assert ENGINE_TOKEN not in page.content() and XSS_TOKEN not in page.content(), "an engine token is in the page before Reveal"
    hostile = page.locator("table#engines tr[data-engine=xss_text]")
    expect(hostile).to_contain_text(f"{XSS} engine")  # the name as text
    assert page.locator("body script").count() == 0
    tab.shot("engines")
    row.locator("button[data-action=reveal]").click()
    expect(row.locator("code[data-testid=url]")).to_have_text(url)
    row.locator("button[data-action=copy]").click()
    wait_for(lambda: tab.clipboard() == url, "the engine URL in the clipboard")  # written asynchronously by the page

    # usage: the tokens the upstream reported (7 + 3 per answered job), as a chart, a table and CSV
    page.click("nav a[data-nav=usage]")
    expect(page.locator("svg#usage-chart")).to_be_visible()
    rows = page.locator("table#usage tbody tr").filter(has=page.locator("td[data-col=engine]", has_text=re.compile(r"^\s*acme_text\s*$")))
    prompt = sum(int(t) for t in rows.locator("td[data-col=prompt_tokens]").all_inner_texts())
    completion = sum(int(t) for t in rows.locator("td[data-col=completion_tokens]").all_inner_texts())
    assert (prompt, completion) == (14, 6)
    tab.shot("usage")
    csv_link = page.locator("a[data-testid=csv]")
    expect(csv_link).to_have_attribute("href", re.compile(r"/admin/usage\.csv\?days=14$"))
    csv = page.request.get(gw.url + (csv_link.get_attribute("href") or "").split(gw.url, 1)[-1])
    assert csv.status == 200 and csv.headers["content-type"].startswith("text/csv"), (csv.status, csv.headers)
    assert "attachment" in csv.headers.get("content-disposition", "")
    assert "acme_text" in csv.text() and "day" in csv.text().splitlines()[0]

    # plugins
    page.click("nav a[data-nav=plugins]")
    expect(page.locator("table#plugins tr[data-plugin='gateway.metrics'] td[data-col=hooks]")).to_contain_text("task_failed")
    tab.shot("plugins")

    # portals without app mode: the page says so
    page.click("nav a[data-nav=portals]")
    expect(page.locator("[data-testid=app-mode-off]")).to_be_visible()
    expect(page.locator("table#tenants")).to_have_count(0)

    # CSRF: a POST without the token, with a wrong one, and a form whose field was removed: 403, nothing done
    tab.allow_status(403)
    forms: list[dict[str, str | float | bool]] = [{}, {"csrf": "not-the-token"}]
    for form in forms:
        refused = page.request.post(gw.url + "/admin/logout", form=form, max_redirects=0)
        assert refused.status == 403 and "CSRF" in refused.text(), (form, refused.status)
    page.evaluate("document.querySelector('form[data-action=logout] input[name=csrf]').remove()")
    with page.expect_navigation() as navigation:
        page.click("form[data-action=logout] button")
    assert navigation.value is not None and navigation.value.status == 403
    expect(page.locator("main")).to_contain_text("CSRF")
    page.goto(gw.url + "/admin/")  # still logged in: the refused logout did nothing
    expect(page).to_have_url(gw.url + "/admin/")
    page.click("form[data-action=logout] button")
    expect(page).to_have_url(re.compile(re.escape(gw.url + "/admin/login")))
    page.goto(gw.url + "/admin/engines")
    expect(page).to_have_url(re.compile(re.escape(gw.url + "/admin/login?next=")))

    # five wrong passwords from one client: the sixth attempt is refused before its password is checked, even the right one
    tab.allow_status(401, 429)
    statuses = [submit_login(page, f"wrong-password-{i}").status for i in range(5)]
    assert statuses == [401] * 5
    throttled = submit_login(page, PASSWORD)
    assert throttled.status == 429 and int(throttled.headers["retry-after"]) > 0, throttled.headers
    expect(page.locator(".flash.error")).to_contain_text("Too many failed logins")
    expect(page.locator("nav")).to_have_count(0)


@pytest.fixture
def oauth() -> Iterator[OAuthEmulator]:
    server = OAuthEmulator(CLIENT_ID, CLIENT_SECRET)
    with LoopbackServer(server.app) as running:
        server.url = running.url
        yield server


def test_disable_an_installed_portal(
    tab: Tab, gateway: Callable[..., GatewayProcess], portal: PortalEmulator, upstream: FakeOpenAI, oauth: OAuthEmulator
) -> None:
    config = app_config(upstream.url)
    config["admin"] = {"password": PASSWORD}
    gw = gateway(config)
    url = installed(gw, oauth, portal)
    [shown] = gw.cli_json("tenants", "list")

    def answer() -> httpx.Response:
        _, body = portal.new_request(auth=portal.app_auth())
        return portal.send(url, body)

    assert answer().status_code == 202
    page = tab.page
    log_in(tab, gw.url)
    page.click("nav a[data-nav=portals]")
    row = page.locator(f"table#tenants tr[data-tenant='{shown['tenant']}']")
    expect(row.locator("td[data-col=domain]")).to_have_text(portal.domain)
    expect(row.locator("td[data-col=status]")).to_have_text("active")
    expect(row.locator("td[data-col=registration]")).to_contain_text("done")
    tab.shot("portals")

    row.locator("form[data-action=disable] button").click()
    expect(page.locator(".flash.ok")).to_be_visible()
    expect(row.locator("td[data-col=status]")).to_have_text("disabled")
    assert gw.cli_json("tenants", "show", portal.member_id)["status"] == "disabled"
    refused: httpx.Response = wait_for(lambda: (r := answer()).status_code != 202 and r, "the disabled portal's request refused")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "tenant_disabled", refused.text

    row.locator("form[data-action=enable] button").click()
    expect(row.locator("td[data-col=status]")).to_have_text("active")
    wait_for(lambda: answer().status_code == 202, "the enabled portal's request accepted")


def wait_for(check: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    """Poll ``check`` (bounded): what a page set in motion (a tenant's status, the clipboard) takes effect shortly after."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            assert value, f"{what} within {timeout} s"
            return value
        time.sleep(0.2)


def test_the_dashboard_behind_a_reverse_proxy_with_a_path_prefix(tab: Tab, tmp_path: Path, portal: PortalEmulator, upstream: FakeOpenAI) -> None:
    proxy = PrefixProxy("/gw")
    with LoopbackServer(proxy.app) as front:
        site = front.url + "/gw"
        gw = GatewayProcess(make_config(upstream.url, admin={"password": PASSWORD}), tmp_path, public_url=site)
        gw.start()
        proxy.target = gw.url  # after the start: a first start may move to another port
        try:
            page = tab.page
            log_in(tab, site)
            [cookie] = [c for c in tab.context.cookies() if c["name"] == "gw_admin"]
            assert (cookie["path"], cookie["httpOnly"], cookie["sameSite"]) == ("/gw/admin", True, "Strict")

            url = gw.completions_url()
            assert url.startswith(site + "/engines/acme_text/")
            send(gw, portal)  # the portal's request goes through the proxy too
            [job] = gw.wait_final(1)
            with page.expect_response(lambda r: r.url.startswith(site + "/admin/overview/live"), timeout=LIVE_MS) as live:
                pass
            assert live.value.status == 200
            expect(page.locator("[data-testid=totals] [data-metric=accepted]")).to_have_text("1", timeout=LIVE_MS)
            tab.shot("prefix-overview")

            page.click("nav a[data-nav=jobs]")
            page.locator(f"tr[data-job-id='{job['id']}'] a.job-link").click()
            expect(page).to_have_url(f"{site}/admin/jobs/{job['id']}")
            expect(page.locator("[data-testid=job-state]")).to_have_text("delivered")
            page.click("nav a[data-nav=engines]")
            row = page.locator("table#engines tr[data-engine=acme_text]")
            row.locator("button[data-action=reveal]").click()
            expect(row.locator("code[data-testid=url]")).to_have_text(url)
            for name in ("usage", "plugins", "portals", "overview"):
                page.click(f"nav a[data-nav={name}]")
                expect(page.locator(f"nav a[data-nav={name}]")).to_have_attribute("aria-current", "page")
            page.click("form[data-action=logout] button")
            expect(page).to_have_url(re.compile(re.escape(site + "/admin/login")))

            outside = [r for r in proxy.outside() if r.path != "/favicon.ico"]  # asked for by the browser itself
            assert outside == [], "pages linked or redirected outside the prefix"
            failed = [r for r in proxy.requests if r.status >= 400 and r.path != "/favicon.ico"]
            assert failed == [], failed
        finally:
            gw.kill()
