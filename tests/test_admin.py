"""The admin dashboard's frame, in process: configuration, passwords, sessions, CSRF, the login
throttle, the hostile query strings of the jobs page, chart geometry, and every page answering.
The browser tests (tests/test_admin_browser.py) drive the same pages in Chromium over real sockets."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from gateway.admin.charts import nice_ceiling, stacked_bars
from gateway.admin.filters import PAGE_SIZE, SINCE_CHOICES, read_job_filters
from gateway.admin.passwords import PasswordBook, PasswordHashError, hash_password, verify_password
from gateway.admin.sessions import SessionSigner, session_key
from gateway.admin.site import safe_next
from gateway.admin.throttle import LoginThrottle
from gateway.app import create_app
from gateway.config import AdminSettings, AdminUser, ConfigError, parse_config
from gateway.outcomes import JobState
from gateway.tasks import Category
from gateway.testing import make_config

PASSWORD = "correct horse battery staple"
BASE = "http://127.0.0.1:8080"


def admin_config(tmp_path: Path, **admin: Any) -> Any:
    data = make_config("http://127.0.0.1:9", admin=admin or {"password": PASSWORD})
    data["public_url"] = BASE
    data["data_dir"] = str(tmp_path / "var")
    data["queue"]["path"] = str(tmp_path / "var" / "queue.sqlite3")
    return parse_config(data, tmp_path / "gateway.yaml")


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(admin_config(tmp_path)), base_url=BASE, follow_redirects=False) as test_client:
        yield test_client


def login_token(client: TestClient, path: str = "/admin/login") -> str:
    page = client.get(path)
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found, page.text
    return found.group(1)


def log_in(client: TestClient, password: str = PASSWORD, user: str = "admin") -> Any:
    token = login_token(client)
    return client.post("/admin/login?next=/jobs", data={"csrf": token, "username": user, "password": password})


def page_token(client: TestClient, path: str = "/admin/") -> str:
    found = re.search(r'name="csrf-token" content="([^"]+)"', client.get(path).text)
    assert found
    return found.group(1)


# -- configuration ---------------------------------------------------------------------------------
def test_config_admin_forms(tmp_path: Path) -> None:
    assert admin_config(tmp_path).admin == AdminSettings((AdminUser("admin", PASSWORD),))
    hashed = hash_password(PASSWORD)
    two = admin_config(tmp_path, users=[{"name": "alice", "password": hashed}, {"name": "bob@example.com", "password": PASSWORD}], session_hours=2)
    assert [u.name for u in two.admin.users] == ["alice", "bob@example.com"] and two.admin.session_hours == 2
    assert parse_config(make_config("http://127.0.0.1:9"), tmp_path / "g.yaml").admin is None


@pytest.mark.parametrize(
    ("admin", "key", "words"),
    [
        ({"password": "tiny-pw"}, "admin.password", "shorter than 12"),
        ({"password": "scrypt$1$2"}, "admin.password", "not a complete scrypt hash"),
        ({"password": "scrypt$16384$8$1$c2FsdHNhbHRzYWx0c2FsdA==$" + "A" * 43 + "=\n"}, "admin.password", "not a complete scrypt hash"),
        ({"users": [{"name": "alice\n", "password": PASSWORD}]}, "admin.users[0].name", "letters, digits"),
        ({}, "admin", "either `password` or `users`"),
        ({"password": PASSWORD, "users": []}, "admin", "either `password` or `users`"),
        ({"users": []}, "admin.users", "non-empty list"),
        ({"users": [{"name": "a b", "password": PASSWORD}]}, "admin.users[0].name", "letters, digits"),
        ({"users": [{"name": "a", "password": PASSWORD}, {"name": "a", "password": PASSWORD}]}, "admin.users[1].name", "listed twice"),
        ({"password": PASSWORD, "session_secret": "too-short"}, "admin.session_secret", "shorter than 32"),
        ({"password": PASSWORD, "sesion_hours": 1}, "admin.sesion_hours", "did you mean `session_hours`"),
    ],
)
def test_config_admin_errors_name_the_key_and_never_the_password(tmp_path: Path, admin: dict[str, Any], key: str, words: str) -> None:
    data = make_config("http://127.0.0.1:9", admin=admin)
    with pytest.raises(ConfigError) as caught:
        parse_config(data, tmp_path / "gateway.yaml")
    assert caught.value.key == key and words in str(caught.value) and caught.value.fix
    assert "tiny-pw" not in str(caught.value) and PASSWORD not in str(caught.value)


# -- passwords -------------------------------------------------------------------------------------
def test_passwords_hash_and_verify() -> None:
    stored = hash_password(PASSWORD, n=2**10)
    assert stored.startswith("scrypt$1024$8$1$") and PASSWORD not in stored
    assert verify_password(PASSWORD, stored) and not verify_password(PASSWORD + "x", stored)
    assert hash_password(PASSWORD, n=2**10) != stored  # salted
    book = PasswordBook([AdminUser("admin", PASSWORD), AdminUser("alice", stored)], b"k" * 32)
    assert book.check("admin", PASSWORD) and book.check("alice", PASSWORD)
    assert not book.check("admin", "wrong") and not book.check("nobody", PASSWORD)
    assert book.fingerprint("admin") != book.fingerprint("alice")
    # another process, or a restart: a new salt for the plain password, the same fingerprint (sessions survive)
    again = PasswordBook([AdminUser("admin", PASSWORD), AdminUser("alice", stored)], b"k" * 32)
    assert again.fingerprint("admin") == book.fingerprint("admin") and again.fingerprint("alice") == book.fingerprint("alice")
    assert PasswordBook([AdminUser("admin", PASSWORD + "!")], b"k" * 32).fingerprint("admin") != book.fingerprint("admin")
    assert PasswordBook([AdminUser("admin", PASSWORD)], b"x" * 32).fingerprint("admin") != book.fingerprint("admin")


@given(st.text(max_size=120))
@settings(max_examples=200, deadline=None)
def test_a_malformed_hash_is_a_password_hash_error_and_nothing_else(stored: str) -> None:
    try:
        verify_password("x", stored)
    except PasswordHashError:
        pass


def test_hash_parameters_are_bounded() -> None:
    with pytest.raises(PasswordHashError, match="out of bounds"):
        verify_password("x", "scrypt$1073741824$8$1$c2FsdHNhbHRzYWx0$" + "A" * 44)


# -- sessions --------------------------------------------------------------------------------------
def signer(clock: list[float], fingerprint: dict[str, str] | None = None) -> SessionSigner:
    prints = fingerprint if fingerprint is not None else {"admin": "f1"}
    return SessionSigner(b"k" * 32, 1.0, lambda user: prints.get(user, ""), clock=lambda: clock[0])


def test_sessions_sign_expire_revoke_and_end_on_a_password_change() -> None:
    clock, prints = [1000.0], {"admin": "f1"}
    sessions = signer(clock, prints)
    cookie, session = sessions.issue("admin")
    assert sessions.read(cookie) == session and session.user == "admin"
    payload, mac = cookie.split(".")
    assert sessions.read(payload + "." + mac[:-2] + ("AA" if mac[-2:] != "AA" else "BB")) is None  # forged
    assert SessionSigner(b"x" * 32, 1.0, lambda u: "f1", clock=lambda: clock[0]).read(cookie) is None  # another key
    prints["admin"] = "f2"
    assert sessions.read(cookie) is None  # the password changed
    prints["admin"] = "f1"
    clock[0] += 3601
    assert sessions.read(cookie) is None  # expired
    clock[0] = 1000.0
    sessions.revoke(session)
    assert sessions.read(cookie) is None


def test_csrf_tokens_belong_to_their_session() -> None:
    sessions = signer([0.0])
    token = sessions.csrf_token("session-1")
    assert sessions.check_csrf("session-1", token)
    assert not sessions.check_csrf("session-2", token) and not sessions.check_csrf("session-1", None) and not sessions.check_csrf("session-1", "")


@given(st.one_of(st.none(), st.text(max_size=2000), st.from_regex(r"[A-Za-z0-9_-]{0,80}\.[A-Za-z0-9_-]{0,80}", fullmatch=True)))
@settings(max_examples=300, deadline=None)
def test_any_cookie_is_read_as_a_session_or_none(cookie: str | None) -> None:
    sessions = signer([0.0])
    assert sessions.read(cookie) is None
    assert sessions.unseal(cookie) is None


def test_the_session_key_is_shared_by_processes_and_taken_from_the_secret(tmp_path: Path) -> None:
    settings_ = AdminSettings((AdminUser("admin", PASSWORD),))
    first = session_key(settings_, tmp_path)
    assert session_key(settings_, tmp_path) == first and len(first) == 32
    assert (tmp_path / "admin-session.key").stat().st_mode & 0o777 == 0o600
    assert session_key(AdminSettings(settings_.users, session_secret="s" * 40), tmp_path) != first


# -- the login throttle ----------------------------------------------------------------------------
def test_throttle_locks_a_client_and_slows_a_user_name() -> None:
    now = [0.0]
    throttle = LoginThrottle(per_client=3, per_user=5, window=60, user_spacing=2, clock=lambda: now[0])
    for _ in range(3):
        assert throttle.retry_after("1.1.1.1", "admin") == 0
        throttle.failed("1.1.1.1", "admin")
    assert throttle.retry_after("1.1.1.1", "admin") == pytest.approx(60)
    assert throttle.retry_after("2.2.2.2", "admin") == 0  # another client, under the user's limit
    throttle.failed("2.2.2.2", "admin")
    throttle.failed("3.3.3.3", "admin")
    assert throttle.retry_after("4.4.4.4", "admin") == pytest.approx(2)  # the user's limit, from anywhere: slowed, not locked
    now[0] = 2.5
    assert throttle.retry_after("4.4.4.4", "admin") == 0 and throttle.retry_after("1.1.1.1", "admin") > 0
    throttle.failed("4.4.4.4", "admin")  # counted when it starts ...
    throttle.succeeded("4.4.4.4", "admin")  # ... and taken back when the password matched
    assert throttle.retry_after("4.4.4.4", "someone") == 0 and throttle.retry_after("5.5.5.5", "admin") == 0  # the success took its count back
    now[0] = 61
    assert throttle.retry_after("1.1.1.1", "admin") == 0 and throttle.retry_after("4.4.4.4", "admin") == 0


# -- hostile input ---------------------------------------------------------------------------------
@given(st.dictionaries(st.sampled_from(["state", "engine", "category", "portal", "since", "before", "x"]), st.text(max_size=60)))
@settings(max_examples=300, deadline=None)
def test_job_filters_take_only_offered_values(params: dict[str, str]) -> None:
    form, problem = read_job_filters(params, ["acme_text"], now=1_000_000.0)
    assert form.state in ("", *(str(s) for s in JobState)) and form.engine in ("", "acme_text")
    assert form.category in ("", *(str(c) for c in Category)) and form.limit == PAGE_SIZE
    assert form.before == "" or re.fullmatch(r"[0-9a-f]{24}", form.before)
    assert form.portal == "" or re.fullmatch(r"[a-z0-9.-]{1,253}(:[0-9]{1,5})?", form.portal)
    job_filter = form.to_filter()
    assert (job_filter.accepted_since is None) == (form.since == "")
    dropped = any(params.get(k) and getattr(form, k) != params[k] for k in ("state", "engine", "category", "before"))
    assert bool(problem) >= dropped


def test_job_filters_read_the_offered_choices() -> None:
    form, problem = read_job_filters({"state": "dead", "engine": "acme_text", "since": "1h", "portal": "ACME.bitrix24.com"}, ["acme_text"], now=10_000.0)
    assert problem == "" and form.to_filter().state is JobState.DEAD and form.to_filter().accepted_since == 10_000.0 - 3600
    assert form.portal == "acme.bitrix24.com" and form.query() == {"state": "dead", "engine": "acme_text", "since": "1h", "portal": "acme.bitrix24.com"}
    assert set(SINCE_CHOICES) <= {"15m", "1h", "6h", "24h", "7d"}


@given(st.text(max_size=80))
def test_next_is_always_a_dashboard_path(target: str) -> None:
    path = safe_next(target)
    assert path.startswith("/") and not path.startswith("//") and "\\" not in path


# -- charts ----------------------------------------------------------------------------------------
@given(st.floats(min_value=0, max_value=1e12, allow_nan=False))
def test_nice_ceiling_is_round_and_not_below(value: float) -> None:
    top = nice_ceiling(value)
    assert top >= value and top >= 1
    mantissa = top / 10 ** int(f"{top:e}".split("e")[1])
    assert round(mantissa, 6) in (1.0, 2.0, 5.0, 10.0)


@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(-5, 10**6)), max_size=90))
@settings(max_examples=200, deadline=None)
def test_stacked_bars_stay_inside_the_plot(values: list[tuple[int, int, int]]) -> None:
    columns = [(str(i), {"a": a, "b": b, "line": c}) for i, (a, b, c) in enumerate(values)]
    chart = stacked_bars(columns, (("a", "ok-bar", "A"), ("b", "bad-bar", "B")), line=("line", "L"))
    for bar in chart.bars:
        assert 0 <= bar.y and bar.y + bar.height <= chart.height - 22 + 0.05 and bar.height > 0
    assert chart.empty == all(a == b == 0 and c <= 0 for a, b, c in values)


# -- the site in process ---------------------------------------------------------------------------
def test_pages_need_a_login_and_the_login_returns_to_the_page(client: TestClient) -> None:
    answer = client.get("/admin/jobs?state=dead")
    assert answer.status_code == 303 and answer.headers["location"] == "/admin/login?next=/jobs%3Fstate%3Ddead"
    assert client.get("/admin").headers["location"] == "/admin/"
    done = log_in(client)
    assert done.status_code == 303 and done.headers["location"] == "/admin/jobs"
    cookie = done.headers["set-cookie"]
    assert "gw_admin=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/admin" in cookie and "Secure" not in cookie
    for path in ("/admin/", "/admin/overview/live", "/admin/jobs", "/admin/engines", "/admin/portals", "/admin/usage", "/admin/plugins"):
        page = client.get(path)
        assert page.status_code == 200, path
        assert page.headers["content-security-policy"].startswith("default-src 'none'") and page.headers["x-frame-options"] == "DENY"
        assert page.headers["cache-control"] == "no-store"
        assert path.endswith("/live") or re.search(r"<title>[^<]+ · Bitrix24 AI gateway</title>", page.text), path
    assert "the OpenAI-compatible API is off" in client.get("/admin/usage").text
    csv = client.get("/admin/usage.csv?days=7")
    assert csv.status_code == 200 and csv.headers["content-type"].startswith("text/csv") and "attachment" in csv.headers["content-disposition"]
    assert csv.text.startswith("day,surface,engine,who,")


def test_a_wrong_password_is_refused_and_repeated_failures_are_throttled(client: TestClient) -> None:
    wrong = log_in(client, "not the password at all")
    assert wrong.status_code == 401 and "Wrong user name or password." in wrong.text and "gw_admin=" not in wrong.headers.get("set-cookie", "")
    assert log_in(client, PASSWORD, user="nobody").status_code == 401
    for _ in range(3):
        log_in(client, "still wrong, again")
    limited = log_in(client)  # even the right password waits: the client is over its limit
    assert limited.status_code == 429 and "Too many failed logins" in limited.text and int(limited.headers["retry-after"]) > 0


def test_the_login_form_itself_needs_its_csrf_token(client: TestClient) -> None:
    client.get("/admin/login")
    answer = client.post("/admin/login", data={"username": "admin", "password": PASSWORD})
    assert answer.status_code == 403 and "CSRF" in answer.text


def test_actions_without_csrf_or_from_another_origin_are_refused(client: TestClient) -> None:
    log_in(client)
    token = page_token(client)
    assert "CSRF" in client.post("/admin/logout").text and client.post("/admin/logout").status_code == 403
    assert client.post("/admin/logout", data={"csrf": "forged"}).status_code == 403
    assert client.post("/admin/engines/acme_text/url").status_code == 403
    foreign = client.post("/admin/logout", data={"csrf": token}, headers={"Origin": "https://evil.example"})
    assert foreign.status_code == 403 and "Origin" in foreign.text
    revealed = client.post("/admin/engines/acme_text/url", headers={"X-CSRF-Token": token, "Origin": BASE})
    assert revealed.status_code == 200 and revealed.json()["url"].endswith("/engines/acme_text/" + make_config("x")["engines"][0]["token"] + "/completions")
    assert client.get("/admin/").status_code == 200  # still logged in: nothing was done


def test_logout_ends_the_session(client: TestClient) -> None:
    log_in(client)
    cookie = client.cookies.get("gw_admin")
    assert client.post("/admin/logout", data={"csrf": page_token(client)}).status_code == 303
    client.cookies.set("gw_admin", cookie or "", path="/admin")
    assert client.get("/admin/").status_code == 303  # the copied cookie no longer works in this process


def test_bad_input_gets_a_page_not_an_error(client: TestClient) -> None:
    log_in(client)
    assert client.get("/admin/jobs/not-a-job").status_code == 404
    assert client.get("/admin/jobs/" + "0" * 24).status_code == 404
    filtered = client.get("/admin/jobs?state=<script>&since=forever&before=zz")
    assert filtered.status_code == 200 and "<script>" not in filtered.text and "Ignored:" in filtered.text
    token = page_token(client)
    assert client.post(f"/admin/jobs/{'0' * 24}/cancel", data={"csrf": token}).status_code == 303  # refused, said on the page
    assert client.post("/admin/jobs/x/explode", data={"csrf": token}).status_code == 404
    assert client.post("/admin/portals/0123456789abcdef/disable", data={"csrf": token}).status_code == 404  # app mode is off
    assert client.post("/admin/logout", content=b"csrf=" + b"a" * 20000, headers={"content-type": "application/x-www-form-urlencoded"}).status_code == 400


def test_a_session_survives_a_restart_and_hostile_tokens_and_forms_get_4xx(tmp_path: Path) -> None:
    with TestClient(create_app(admin_config(tmp_path)), base_url=BASE, follow_redirects=False) as first:
        log_in(first)
        cookie = first.cookies.get("gw_admin")
        for token in ("tökén", "\udcff", "x" * 200):
            assert first.post("/admin/logout", headers={"X-CSRF-Token": token.encode("utf-8", "surrogateescape")}).status_code == 403
            form = b"csrf=" + token.encode("utf-8", "surrogateescape")  # raw bytes, as a hostile client sends them
            assert first.post("/admin/logout", content=form, headers={"content-type": "application/x-www-form-urlencoded"}).status_code == 403
        many = "&".join(f"f{i}=1" for i in range(60))
        assert first.post("/admin/logout", content=many.encode(), headers={"content-type": "application/x-www-form-urlencoded"}).status_code == 400
        assert first.get("/admin/jobs?before=" + "0" * 24 + "%0A").status_code == 200
    with TestClient(create_app(admin_config(tmp_path)), base_url=BASE, follow_redirects=False) as second:  # a restart, or another process
        second.cookies.set("gw_admin", cookie or "", path="/admin")
        assert second.get("/admin/").status_code == 200
        login = second.get("/admin/login").text
        token = re.search(r'name="csrf" value="([^"]+)"', login)
        assert token
        many = "&".join(f"f{i}=1" for i in range(60))
        answer = second.post("/admin/login", content=f"csrf={token.group(1)}&{many}".encode(), headers={"content-type": "application/x-www-form-urlencoded"})
        assert answer.status_code == 400


def test_the_usage_page_lists_api_keys_without_their_secrets(tmp_path: Path) -> None:
    secret = "sk-gw-test-0123456789abcdefSECRET"
    data = make_config("http://127.0.0.1:9", admin={"password": PASSWORD})
    data.update(public_url=BASE, data_dir=str(tmp_path / "var"))
    data["api_keys"] = [{"name": "scripts", "secret": secret, "engines": ["acme_text"], "requests_per_minute": 30}]
    with TestClient(create_app(parse_config(data, tmp_path / "g.yaml")), base_url=BASE, follow_redirects=False) as keyed:
        log_in(keyed)
        page = keyed.get("/admin/usage").text
        assert "<title>Usage · Bitrix24 AI gateway</title>" in page
        main = page.split("<main>", 1)[1]
        assert 'data-key="scripts"' in main and ">30<" in main and secret not in page and secret[:12] not in page


def test_without_an_admin_section_the_dashboard_is_off(tmp_path: Path) -> None:
    config = parse_config({**make_config("http://127.0.0.1:9"), "data_dir": str(tmp_path)}, tmp_path / "g.yaml")
    with TestClient(create_app(config), base_url=BASE) as plain:
        answer = plain.get("/admin/")
        assert answer.status_code == 404 and "admin dashboard is off" in answer.json()["error_description"]


def test_links_follow_the_public_urls_path(tmp_path: Path) -> None:
    config = admin_config(tmp_path)
    behind = parse_config(
        {**make_config("http://127.0.0.1:9", admin={"password": PASSWORD}), "public_url": "https://gw.example.com/ai", "data_dir": str(tmp_path)}, config.path
    )
    with TestClient(create_app(behind), base_url="http://127.0.0.1:8080", follow_redirects=False) as proxied:
        answer = proxied.get("/admin/jobs")
        assert answer.headers["location"] == "/ai/admin/login?next=/jobs"
        page = proxied.get("/admin/login")
        assert 'action="/ai/admin/login?next=/"' in page.text and 'href="/ai/admin/static/admin.css"' in page.text
        assert "Secure" in page.headers["set-cookie"] and "Path=/ai/admin/login" in page.headers["set-cookie"]


ROUTES = (
    "/admin/",
    "/admin/overview/live",
    "/admin/jobs",
    "/admin/jobs/{x}",
    "/admin/jobs/{x}/{y}",
    "/admin/engines",
    "/admin/engines/{x}/url",
    "/admin/engines/{x}/{y}",
    "/admin/portals",
    "/admin/portals/{x}/{y}",
    "/admin/usage",
    "/admin/usage.csv",
    "/admin/plugins",
    "/admin/login",
)
"""Every route (logout aside: it would end the session the others need); segments and queries are hostile."""
SEGMENT = st.one_of(st.sampled_from(["acme_text", "0" * 24, "cancel", "redeliver", "disable", "url", "%00", "..", "%2F", "x" * 300]), st.text(max_size=30))
QUERY = st.dictionaries(st.sampled_from(["state", "engine", "category", "portal", "since", "before", "days", "next", "x"]), st.text(max_size=40), max_size=5)


@pytest.fixture(scope="module")
def logged_in(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, str]]:
    with TestClient(create_app(admin_config(tmp_path_factory.mktemp("fuzz"))), base_url=BASE, follow_redirects=False) as test_client:
        log_in(test_client)
        yield test_client, page_token(test_client)


@given(
    route=st.sampled_from(ROUTES),
    x=SEGMENT,
    y=SEGMENT,
    query=QUERY,
    method=st.sampled_from(["GET", "POST", "HEAD", "PUT"]),
    with_token=st.booleans(),
    body=st.one_of(st.binary(max_size=200), st.dictionaries(st.sampled_from(["csrf", "username", "password", "a"]), st.text(max_size=40), max_size=4)),
)
@settings(max_examples=250, deadline=None)
def test_no_admin_request_gets_a_5xx(
    logged_in: tuple[TestClient, str], route: str, x: str, y: str, query: dict[str, str], method: str, with_token: bool, body: Any
) -> None:
    from urllib.parse import quote

    client, token = logged_in
    path = route.format(x=quote(x, safe="%"), y=quote(y, safe="%"))
    headers = {"X-CSRF-Token": token} if with_token else {}
    if isinstance(body, dict):
        answer = client.request(method, path, params=query, data=body, headers=headers)
    else:
        answer = client.request(method, path, params=query, content=body, headers={**headers, "content-type": "application/x-www-form-urlencoded"})
    assert answer.status_code < 500, (method, path, query, answer.status_code, answer.text[:300])
    if method == "POST" and not with_token and not path.startswith("/admin/login") and answer.status_code not in (404, 405):
        assert answer.status_code == 403 or (isinstance(body, dict) and body.get("csrf") == token), (path, answer.status_code)
    assert client.get("/admin/plugins").status_code == 200  # still logged in: the examples test the pages, not the login page
