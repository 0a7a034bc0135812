"""A real browser for the admin dashboard's tests: Playwright (sync API) driving Debian's Chromium.

Never Playwright's own browser download (``playwright install``: not reachable from every CI);
``make system-packages`` installs ``chromium`` and its fonts with apt-get. Without /usr/bin/chromium
the tests are skipped on a developer's machine and fail in CI (``CI`` set): a CI without the browser
must not pass silently.

Fixtures (a test module imports ``chromium_fixture`` and ``tab_fixture``): ``chromium`` is one browser
for the session; ``tab`` a fresh context and page per test, which fails the test on any page script error,
console error or dialog (``alert`` from injected markup) and saves screenshots to build/screenshots/.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Dialog, Error, Page, ViewportSize, expect, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parents[1] / "build" / "screenshots"
TIMEOUT_MS = 10_000
expect.set_options(timeout=TIMEOUT_MS)  # expect() has its own default (5 s), not the context's
VIEWPORT: ViewportSize = {"width": 1280, "height": 860}
# Quiet and local: no update checks, sync, QUIC or GPU; the tests talk to 127.0.0.1 only.
LAUNCH_ARGS = [
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-gpu",
]
# Chromium logs every answer with an error status as a console error; a test that expects one (a wrong
# password's 401, a refused form's 403) says so with Tab.allow_status.
HTTP_ERROR = re.compile(r"the server responded with a status of (\d{3})")


def launch_args() -> list[str]:
    """Without its sandbox: as root (containers, CI) Chromium refuses to start inside it, and as another user
    it needs the setuid helper (chromium-sandbox, a recommended package `make system-packages` leaves out) or
    unprivileged user namespaces, which a CI machine may not allow. The pages it opens are our own, on 127.0.0.1."""
    return [*LAUNCH_ARGS, "--no-sandbox"]


@pytest.fixture(scope="module", name="chromium")
def chromium_fixture() -> Iterator[Browser]:
    """Debian's Chromium, headless, once per test module: Playwright's sync API keeps an event loop running in
    this thread while it is open, which would break every later asyncio test of the session."""
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing: install Debian's chromium with `make system-packages` (apt-get install chromium fonts-dejavu-core fonts-liberation)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so the browser tests fail instead of being skipped")
        pytest.skip(reason)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=launch_args(), headless=True)
        yield browser
        browser.close()


@dataclass
class Tab:
    """One page in its own browser context, watched for what a working page never does."""

    context: BrowserContext
    page: Page
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    allowed_statuses: set[int] = field(default_factory=set)

    def allow_status(self, *statuses: int) -> None:
        """Answers with these statuses are expected from now on (their console lines are not errors)."""
        self.allowed_statuses.update(statuses)

    def shot(self, name: str) -> Path:
        """Save the whole page as build/screenshots/<name>.png."""
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def clipboard(self) -> str:
        """What the page last wrote to the clipboard (read back through the page, as a paste would)."""
        text: str = self.page.evaluate("navigator.clipboard.readText()")
        return text

    def _console(self, message: ConsoleMessage) -> None:
        if message.type != "error":
            return
        if message.location.get("url", "").endswith("/favicon.ico"):
            return  # the browser's own request when a page names no icon, not the page's doing
        status = HTTP_ERROR.search(message.text)
        if status and int(status.group(1)) in self.allowed_statuses:
            return
        self.errors.append(f"console error at {message.location.get('url', '?')}: {message.text}")

    def _page_error(self, error: Error) -> None:
        self.errors.append(f"uncaught script error on {self.page.url}: {error.message}")

    def _dialog(self, dialog: Dialog) -> None:
        # An alert() from markup a page failed to escape: recorded (the test fails) and dismissed, so the page goes on.
        self.dialogs.append(f"{dialog.type}({dialog.message!r}) on {self.page.url}")
        dialog.dismiss()


@pytest.fixture(name="tab")
def tab_fixture(chromium: Browser) -> Iterator[Tab]:
    """A fresh context (no cookies, clipboard allowed) and page; after the test, no console error,
    no uncaught script error and no dialog may have happened."""
    context = chromium.new_context(viewport=VIEWPORT, permissions=["clipboard-read", "clipboard-write"], locale="en-US", timezone_id="UTC")
    context.set_default_timeout(TIMEOUT_MS)
    context.set_default_navigation_timeout(TIMEOUT_MS)
    page = context.new_page()
    watched = Tab(context, page)
    page.on("console", watched._console)
    page.on("pageerror", watched._page_error)
    page.on("dialog", watched._dialog)
    yield watched
    context.close()
    assert not watched.dialogs, f"a page opened a dialog (markup rendered as code?): {watched.dialogs}"
    assert not watched.errors, "errors in the page:\n" + "\n".join(watched.errors)
