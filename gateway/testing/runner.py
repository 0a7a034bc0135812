"""The gateway under test: ``gateway serve`` in a subprocess on 127.0.0.1, configured for fast tests.

:func:`make_config` gives a config with short leases and quick backoff whose one provider
(``up``, adapter type ``openai``) is the upstream stub; :class:`GatewayProcess` writes it
to a folder, starts the gateway on a free port and drives its CLI; :func:`start_up_error`
loads a config as ``gateway serve`` does at start-up, in this process, to test option errors.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from gateway.config import ConfigError, load_config
from gateway.outcomes import FINAL_STATES

ENGINE_TOKEN = "tok-SECRET-0123456789abcdef"
API_KEY = "sk-test-SECRETKEY-abcdef123456"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def make_config(upstream_url: str, **overrides: Any) -> dict[str, Any]:
    """A config with short timings: leases of 2 s, quick backoff, callbacks to 127.0.0.1 allowed."""
    config: dict[str, Any] = {
        "public_url": "http://127.0.0.1:0",
        "queue": {"backend": "sqlite", "lease_seconds": 2, "poll_interval": 0.1},
        "workers": {"concurrency": 16},
        "security": {"allowed_portals": ["127.0.0.1"], "allow_private_networks": True},
        "routing": {"retries": 2, "backoff_initial": 0.05, "backoff_max": 0.2, "cooldown_failures": 50, "cooldown_seconds": 1},
        "delivery": {"backoff_initial": 0.1, "backoff_max": 0.5, "connect_timeout": 1, "read_timeout": 5},
        "providers": {"up": {"type": "openai", "base_url": upstream_url + "/v1", "api_key": API_KEY, "timeout": 30}},
        "engines": [
            {
                "code": "acme_text",
                "name": "ACME text",
                "category": "text",
                "token": ENGINE_TOKEN,
                "route": [{"provider": "up", "model": "test-model"}],
                "settings": {"code_alias": "ChatGPT"},
            }
        ],
    }
    for key, value in overrides.items():
        config[key] = value
    return config


class _PortTaken(Exception):
    """The gateway could not listen: another server took its port after :func:`free_port` chose it."""


class GatewayProcess:
    """One gateway subprocess on its own port and folder (config, queue, log); see :meth:`start`."""

    def __init__(self, config: dict[str, Any], workdir: Path, *, public_url: str | None = None) -> None:
        """``public_url``: the URL the gateway announces (default: its own port); nodes behind one
        load balancer share one, so their completions URLs are identical."""
        self.workdir = workdir
        self.port = free_port()
        self._own_public_url = public_url is None
        config = dict(config)
        config["public_url"] = public_url or f"http://127.0.0.1:{self.port}"
        config.setdefault("data_dir", str(workdir / "var"))
        self.config = config
        self.config_path = workdir / "gateway.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._started = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def completions_url(self, code: str = "acme_text") -> str:
        """The engine's URL with its token, as ``gateway engines list`` prints it."""
        return str(next(e["completions_url"] for e in self.cli_json("engines", "list") if e["code"] == code))

    def start(self, *extra_args: str, timeout: float = 20.0) -> GatewayProcess:
        """Start ``gateway serve`` (with ``extra_args``) and wait until it answers its health check.
        At a first start, a port taken between :func:`free_port` and the bind (by another test's
        server) is replaced by a new one, up to three times; a restart keeps its port (and URLs)."""
        for _ in range(3 if not self._started else 1):
            try:
                self._start(extra_args, timeout)
            except _PortTaken:
                self.port = free_port()
                if self._own_public_url:
                    self.config["public_url"] = f"http://127.0.0.1:{self.port}"
                    self.config_path.write_text(yaml.safe_dump(self.config))
                continue
            self._started = True
            return self
        raise RuntimeError(f"gateway could not listen on a free port:\n{self.logs()}")

    def _start(self, extra_args: tuple[str, ...], timeout: float) -> None:
        logged = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config", str(self.config_path), "--port", str(self.port), "--log-level", "DEBUG", *extra_args],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=subprocess_env(),
            )
        deadline = time.monotonic() + timeout
        ours = f"serving on {self.url} ".encode()  # printed once this process has bound the port and started
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if not self._started and b"the port is already in use" in self._logged_since(logged):
                    raise _PortTaken
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.logs()}")
            if ours not in self._logged_since(logged):  # a health answer now may be another server's
                time.sleep(0.05)
                continue
            try:
                if httpx.get(self.url + "/-/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"gateway did not become healthy:\n{self.logs()}")

    def _logged_since(self, offset: int) -> bytes:
        """The log from ``offset`` on (this start's lines, not a whole earlier run's)."""
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            return log.read()

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash or an OOM kill."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def popen(self, *args: str) -> subprocess.Popen[bytes]:
        """Another ``gateway`` command on the same config (e.g. ``worker``), logging to the same file."""
        with open(self.log_path, "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "gateway", *args, "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=subprocess_env(),
            )

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "gateway", *args, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            cwd=self.workdir,
            env=subprocess_env(),
            timeout=60,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"gateway {' '.join(args)} exited {result.returncode}: {result.stderr}")
        return result

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def wait_final(self, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until ``count`` jobs are in a final state; returns all jobs."""
        final = {state.value for state in FINAL_STATES}
        deadline = time.monotonic() + timeout
        while True:
            jobs: list[dict[str, Any]] = self.cli_json("jobs", "list", "--limit", "1000")
            if sum(1 for j in jobs if j["state"] in final) >= count or time.monotonic() > deadline:
                return jobs
            time.sleep(0.2)


def subprocess_env() -> dict[str, str]:
    """This process's environment without the variables that would change which plugins or config a gateway loads."""
    env = dict(os.environ)
    env.pop("GATEWAY_LOAD_PLUGINS", None)
    env.pop("GATEWAY_CONFIG", None)
    return env


def start_up_error(config: dict[str, Any], workdir: Path) -> ConfigError:
    """The :class:`~gateway.config.ConfigError` that ``gateway serve`` stops with on ``config``:
    the file is read, adapters are built and their models loaded, in this process.

    Raises AssertionError when the configuration starts without an error."""
    from gateway.runtime import Runtime  # the whole core: imported by the tests that need it only

    path = workdir / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    try:
        Runtime(load_config(path)).prepare()
    except ConfigError as exc:
        return exc
    raise AssertionError(f"{path} started without a configuration error")
