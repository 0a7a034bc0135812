"""``gateway demo``: one request per configured category through a real gateway, from a portal
emulator, with timings, then what a real portal needs to register the engines.

The gateway at ``public_url`` is used when it answers; otherwise the demo starts ``gateway
serve`` on the same config (loading local models takes a moment) and stops it at the end.
Audio and call engines get ``speech.wav`` beside this file (espeak-ng, 6 s, English).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from gateway.bitrix.registration import registration_params
from gateway.bitrix.simulator import Callback, PortalEmulator
from gateway.config import Config
from gateway.engines import Engine, completions_path
from gateway.loopback import LoopbackServer
from gateway.stores import engine_directory
from gateway.tasks import Category

SPEECH = Path(__file__).with_name("speech.wav")
TEXT_PROMPT = "Write a short greeting for our clients"


def portal_prompt(category: str, emulator: PortalEmulator, *, text: str = TEXT_PROMPT, audio: bytes | None = None) -> Any:
    """The ``prompt`` the portal sends for a category; a recording is served by the emulator."""
    if category in (Category.AUDIO.value, Category.CALL.value):
        return {"file": emulator.add_file(audio if audio is not None else SPEECH.read_bytes()), "fields": {}, "fileExtension": ""}
    if category == Category.IMAGE.value:
        return {"prompt": text, "style": None, "format": "square"}
    return text


CALLBACK_REFUSED_HINT = (
    "the portal emulator runs on 127.0.0.1: for local testing add 127.0.0.1 to security.allowed_portals and set security.allow_private_networks: true"
)
"""What to do when the gateway refuses the emulator's callback URL (``callback_not_allowed``)."""


@dataclass(frozen=True)
class Exchange:
    """One request sent from the portal emulator to a gateway, and the callback it brought back."""

    response: httpx.Response
    """The gateway's answer to the completions POST (202 when it took the request)."""
    accepted: float
    """Seconds until that answer."""
    callback: Callback | None
    """The first callback the gateway delivered; None when it did not take the request or no callback came in time."""
    elapsed: float
    """Seconds from the POST to the callback (or to giving up waiting)."""

    @property
    def callback_refused(self) -> bool:
        return "callback_not_allowed" in self.response.text


def exchange(emulator: PortalEmulator, completions_url: str, category: str, prompt: Any, *, timeout: float, ttl: int = 14400) -> Exchange:
    """Send one request as the portal does and wait up to ``timeout`` seconds for its callback
    (`gateway simulate` and `gateway demo` both go through here)."""
    job_hash, body = emulator.new_request(category, prompt, ttl=ttl)
    started = time.monotonic()
    response = emulator.send(completions_url, body)
    accepted = time.monotonic() - started
    if response.status_code != 202:
        return Exchange(response, accepted, None, accepted)
    job = emulator.wait(job_hash, timeout=timeout)
    return Exchange(response, accepted, job.delivered[0] if job.delivered else None, time.monotonic() - started)


def healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/-/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class Demo:
    def __init__(self, config: Config, gateway_url: str | None, *, timeout: float, out: Callable[[str], None] = print) -> None:
        self.config, self.timeout, self.out = config, timeout, out
        self.url = (gateway_url or config.public_url).rstrip("/")
        self.process: subprocess.Popen[bytes] | None = None

    def run(self) -> int:
        if healthy(self.url):
            self.out(f"using the gateway running at {self.url}")
        elif not self._start_gateway():
            return 1
        try:
            return self._requests()
        finally:
            if self.process is not None:
                self.out("stopping the gateway the demo started")
                self.process.terminate()
                self.process.wait(30)

    def _start_gateway(self) -> bool:
        log = Path(self.config.data_dir) / "demo-gateway.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self.out(f"starting `gateway serve --config {self.config.path}` (log: {log}); local models load first ...")
        started = time.monotonic()
        with log.open("ab") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config", str(self.config.path)], stdout=sink, stderr=subprocess.STDOUT
            )
        next_note = started + 5
        while not healthy(self.url):
            if self.process.poll() is not None:
                self.out(f"the gateway exited with {self.process.returncode}; last lines of {log}:")
                self.out("\n".join(log.read_text(errors="replace").splitlines()[-15:]))
                self.process = None
                return False
            if time.monotonic() > started + 180:
                self.out(f"the gateway did not answer at {self.url} within 180 s; see {log}")
                return False
            if time.monotonic() > next_note:
                self.out(f"  ... still starting ({time.monotonic() - started:.0f} s)")
                next_note += 5
            time.sleep(0.1)
        self.out(f"gateway ready at {self.url} in {time.monotonic() - started:.1f} s")
        return True

    def _requests(self) -> int:
        engines = list(engine_directory(self.config))
        emulator = PortalEmulator()
        failures = 0
        with LoopbackServer(emulator.app) as server:
            emulator.url = server.url
            self.out(f"portal emulator on {server.url}\n")
            for category in Category:
                engine = next((e for e in engines if e.config.category is category), None)
                if engine is None:
                    self.out(f"[{category.value}] no engine configured" + (" (add an image provider: see the README)" if category is Category.IMAGE else ""))
                    continue
                failures += not self._one(emulator, engine)
            self.out("\nTo use these engines from a real portal, register them (`gateway engines register` does it for you):")
            for engine in engines:
                params = {**registration_params(engine), "completions_url": engine.completions_url}
                self.out(f"  ai.engine.register {json.dumps(params, ensure_ascii=False)}")
        return 1 if failures else 0

    def _one(self, emulator: PortalEmulator, engine: Engine) -> bool:
        category = engine.config.category.value
        sent = exchange(emulator, self.url + completions_path(engine.code, engine.token), category, portal_prompt(category, emulator), timeout=self.timeout)
        if sent.response.status_code != 202:
            self.out(f"[{category}] {engine.code}: HTTP {sent.response.status_code} {sent.response.text}")
            if sent.callback_refused:
                self.out(f"  {CALLBACK_REFUSED_HINT}")
            return False
        callback = sent.callback
        if callback is None:
            self.out(f"[{category}] {engine.code}: accepted in {sent.accepted * 1000:.0f} ms, no callback within {self.timeout:.0f} s")
            return False
        shown = json.dumps(callback.body, ensure_ascii=False)
        self.out(f"[{category}] {engine.code}: accepted in {sent.accepted * 1000:.0f} ms, {callback.kind} callback after {sent.elapsed:.2f} s")
        self.out(f"    {shown[:400]}{'...' if len(shown) > 400 else ''}")
        return callback.kind == "success"
