"""Run an ASGI app under uvicorn on 127.0.0.1 in a background thread.

For the portal emulator (``gateway simulate``), test servers and benchmarks: a real
server on a real socket, started and stopped from synchronous code.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn


class LoopbackServer:
    def __init__(self, app: Any, port: int = 0, host: str = "127.0.0.1", **options: Any) -> None:
        """``options`` go to ``uvicorn.Config`` (e.g. ``ssl_certfile``, ``timeout_keep_alive``)."""
        self.app, self.host, self.port, self.options = app, host, port, options
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.options.get("ssl_certfile") else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def start(self) -> LoopbackServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        options = {"log_config": None, "access_log": False, "timeout_graceful_shutdown": 1, **self.options}
        config = uvicorn.Config(self.app, **options)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True, name=f"loopback-{self.port}")
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
            self._server = self._thread = None

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
