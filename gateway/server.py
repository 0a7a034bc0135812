"""The HTTP server: uvicorn on a socket bound before anything is announced, with a guard on every connection.

uvicorn has no header-read timeout and no connection cap: a client that opens connections and
never finishes a request head holds each one for ever, and at the process's file limit nobody
else gets in (issue 12, item 5). :class:`GuardedHttpToolsProtocol`, uvicorn's httptools protocol
with a few hooks, adds what is missing (why this and not another server: docs/decisions.md):

- a request head must be complete within ``listen.header_timeout`` seconds of the connection
  opening or of its first byte, and a body within ``listen.body_timeout`` seconds of its head;
  otherwise the client gets 408 and the connection is closed;
- a head larger than :data:`MAX_HEAD_BYTES` gets 431 and is closed;
- at most ``listen.max_connections`` connections are open: the next ones are answered 503 with
  ``Retry-After: 1`` at once and closed, so the process stays below its file limit; by default the
  cap keeps back what the outbound pools can open (:func:`outbound_pools`, :func:`file_reserve`);
- idle keep-alive connections close after ``listen.keep_alive_timeout`` (uvicorn's own timer);
- uvicorn's "Invalid HTTP request received." line is logged at most once per :data:`LOG_EVERY`
  seconds, with a count of the lines left out (:class:`InvalidRequestLogThrottle`).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import resource
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import uvicorn
from prometheus_client import CollectorRegistry, Counter, Gauge
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from gateway.config import Config, ConnectionSettings
from gateway.delivery import MAX_CONNECTIONS as DELIVERY_POOL

log = logging.getLogger("gateway.server")

BASE_RESERVE = 64
"""Open files kept for what is not a network connection: stdio, the listening socket, the event
loop's own descriptors, the queue database (with its WAL and shared-memory files), model files,
pipes to child processes. Outbound connections come on top (:func:`file_reserve`)."""
HTTPX_POOL = 100
"""httpx's default ``max_connections``: the pool size of the download clients and of a provider
that does not set ``max_connections``."""
MIN_CAP = 32
"""The connection cap never goes below this, even when the file limit cannot hold the reserve
(a warning says so at start)."""
CAP_CEILING = 8192
"""The derived connection cap never exceeds this: each connection costs memory, and a portal needs a few."""
MAX_HEAD_BYTES = 64 * 1024
"""A request head (request line and headers) above this size is refused with 431."""
LINGER_SECONDS = 1.0
"""A refused connection is half-closed and drained this long, so that the client reads the 503
instead of a reset; at most :data:`MAX_LINGERING` at a time, the rest are closed at once."""
MAX_LINGERING = 64
LOG_EVERY = 10.0
"""Refusals and timeouts are logged at most once per this many seconds, with counts: a flood
must not turn into a flood of log lines."""

_IDLE, _HEAD, _BODY = "idle", "head", "body"


class ListenError(Exception):
    """The listening socket cannot be opened; the message names the address and the fix."""


@dataclass(frozen=True)
class FileLimit:
    soft: int
    """The soft RLIMIT_NOFILE in effect now."""
    before: int
    """The soft limit the process started with."""
    hard: int


def raise_file_limit() -> FileLimit:
    """Raise the soft open-files limit to the hard one: the common soft default of 1024 is
    what a few hundred idle connections exhaust, while the hard limit is usually far higher."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:  # e.g. macOS refuses more than OPEN_MAX
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, target, exc)
            return FileLimit(soft, soft, hard)
        return FileLimit(target, soft, hard)
    return FileLimit(soft, soft, hard)


def outbound_pools(config: Config) -> dict[str, int]:
    """The most connections each outbound pool of a ``gateway serve`` process can hold open.

    Callbacks are bounded by the deliverer's pool alone (many portals, each with its own lane).
    Provider calls and downloads run inside model-work slots, one request at a time per slot, and
    an httpx pool never holds more connections than it once had requests in flight: each of those
    pools counts its size, or ``workers.concurrency`` if smaller. A provider type that opens no
    connection (a local model) is counted all the same: the figure is an upper bound."""
    slots = config.concurrency
    pools = {"callbacks": DELIVERY_POOL, "image downloads": min(slots, HTTPX_POOL), "recording downloads": min(slots, HTTPX_POOL)}
    for name, provider in config.providers.items():
        size = provider.options.get("max_connections")
        pools[f"provider {name}"] = min(slots, size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else HTTPX_POOL)
    return pools


def file_reserve(pools: Mapping[str, int]) -> int:
    """Open files kept back from client connections: :data:`BASE_RESERVE` plus every outbound pool."""
    return BASE_RESERVE + sum(pools.values())


def connection_cap(settings: ConnectionSettings, file_limit: int, reserve: int) -> int:
    """``listen.max_connections`` if set, else the file limit minus ``reserve``, within
    :data:`MIN_CAP` .. :data:`CAP_CEILING`."""
    if settings.max_connections:
        return settings.max_connections
    return max(MIN_CAP, min(CAP_CEILING, file_limit - reserve))


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_socket(host: str, port: int, config_path: Path | str, backlog: int = 2048) -> socket.socket:
    """Bind and listen on ``host:port`` now, before the app starts, so that a port in use is one
    clear error at once and "serving on" is only ever printed for a port that is ours."""
    where = _where(host, port)
    fix_port = f"pick another port with `gateway serve --port N` or listen.port in {config_path}"
    if not 0 <= port <= 65535:  # getaddrinfo would quietly take it modulo 65536
        raise ListenError(f"cannot listen on {where}: a port is a number from 0 to 65535; {fix_port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise ListenError(
            f"cannot listen on {where}: the host does not resolve ({exc}); "
            f"set --host or listen.host in {config_path} to an address of this machine, e.g. 127.0.0.1 or 0.0.0.0"
        ) from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart does not wait for TIME_WAIT
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ListenError(
                f"cannot listen on {where}: the port is already in use (another gateway or program listens there); stop it, or {fix_port}"
            ) from None
        if exc.errno == errno.EACCES:
            raise ListenError(f"cannot listen on {where}: permission denied (ports below 1024 need privileges); {fix_port}") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise ListenError(
                f"cannot listen on {where}: {host} is not an address of this machine; set --host or listen.host in {config_path}, e.g. 127.0.0.1 or 0.0.0.0"
            ) from None
        raise ListenError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    return sock


def listen_url(sock: socket.socket) -> str:
    """The URL of a bound socket, with the port it really got (``--port 0`` picks a free one)."""
    host, port = sock.getsockname()[:2]
    return f"http://{_where(host, port)}"


def _error_response(status: int, code: str, message: str, default_headers: list[tuple[bytes, bytes]], extra: str = "") -> bytes:
    """A complete ``Connection: close`` response with the gateway's JSON error body."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = [STATUS_LINE[status]]
    head += [name + b": " + value + b"\r\n" for name, value in default_headers]
    head.append(f"content-type: application/json\r\ncontent-length: {len(body)}\r\n{extra}connection: close\r\n\r\n".encode())
    return b"".join(head) + body


class ConnectionGuard:
    """What all connections of one server share: the limits, the counters and the rate-limited log."""

    def __init__(self, settings: ConnectionSettings, max_connections: int, registry: CollectorRegistry | None = None) -> None:
        self.header_timeout = settings.header_timeout
        self.body_timeout = settings.body_timeout
        self.max_connections = max_connections
        self.lingering = 0
        self.connections: set[Any] = set()
        self._pending: dict[str, int] = {}
        self._next_log = 0.0
        self._refused: Counter | None = None
        self._closed: Counter | None = None
        if registry is not None:
            self._refused = Counter("gateway_connections_refused", "Connections answered 503 because listen.max_connections were open", registry=registry)
            self._closed = Counter(
                "gateway_connections_closed",
                "Connections the server closed on a client: head or body too slow (timeout), head too large",
                ["reason"],
                registry=registry,
            )
            Gauge("gateway_connections_open", "Open client connections", registry=registry).set_function(lambda: len(self.connections))

    def note(self, reason: str) -> None:
        """Count a refusal (``refused``) or a closed connection (``header_timeout``, ``body_timeout``, ``head_too_large``)."""
        if reason == "refused":
            if self._refused is not None:
                self._refused.inc()
        elif self._closed is not None:
            self._closed.labels(reason).inc()
        self._pending[reason] = self._pending.get(reason, 0) + 1
        now = time.monotonic()
        if now >= self._next_log:
            self._next_log = now + LOG_EVERY
            counts = ", ".join(f"{name} {count}" for name, count in sorted(self._pending.items()))
            self._pending.clear()
            log.warning(
                "client connections cut off since the last report (%s); %d open of at most %d; next report in %.0f s at the earliest",
                counts,
                len(self.connections),
                self.max_connections,
                LOG_EVERY,
            )


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus the connection cap and the head and body timeouts.

    The timer follows the phase of the connection (head, body, idle) and is only armed when a
    phase outlives the ``data_received`` call that began it: a request that arrives in one piece
    costs no timer at all."""

    guard: ClassVar[ConnectionGuard]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = _IDLE
        self._deadline: float | None = None
        self._head_bytes = 0
        self._head_seen = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline: float | None = None
        self._refused = False
        self._lingering = False

    # -- connection ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        guard = self.guard
        guard.connections = self.connections
        if len(self.connections) >= guard.max_connections:
            self._refuse(transport)
            return
        super().connection_made(transport)
        self._start_head()
        self._deadline = self.loop.time() + guard.header_timeout
        self._sync_timer()

    def _refuse(self, transport: asyncio.Transport) -> None:
        """503 with ``Retry-After`` before reading anything, then a lingering close: the write side
        is shut and what the client still sends is discarded for up to :data:`LINGER_SECONDS`, so
        that it reads the answer rather than a connection reset."""
        self._refused = True
        self.transport = transport
        guard = self.guard
        guard.note("refused")
        transport.write(
            _error_response(
                503,
                "too_many_connections",
                f"the gateway has its maximum of {guard.max_connections} connections open; retry in a second",
                self.server_state.default_headers,
                extra="retry-after: 1\r\n",
            )
        )
        if guard.lingering >= MAX_LINGERING or not transport.can_write_eof():
            transport.close()
            return
        guard.lingering += 1
        self._lingering = True
        transport.write_eof()
        self._timer = self.loop.call_later(LINGER_SECONDS, transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._refused:
            if self._lingering:
                self._lingering = False
                self.guard.lingering -= 1
            return
        self._phase = _IDLE
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._phase == _IDLE:  # any byte, even a stray CRLF, starts the clock for the next head
            self._start_head()
        self._head_seen = True
        super().data_received(data)
        if self._phase == _IDLE and self._timer is None:  # the common case: the request came whole
            return
        if self._phase == _HEAD and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._cut_off("head_too_large", 431, "headers_too_large", f"the request head exceeds {MAX_HEAD_BYTES} bytes")
                return
        if self._phase != _IDLE and self._deadline is None:  # the phase began in this call and outlived it: its clock starts now
            self._deadline = self.loop.time() + (self.guard.header_timeout if self._phase == _HEAD else self.guard.body_timeout)
        self._sync_timer()

    # -- parser callbacks (a message begun after another in the same data is covered by
    #    uvicorn's keep-alive timer, then by the head clock from its next byte) ------------------
    def on_headers_complete(self) -> None:
        self._phase, self._deadline = _BODY, None  # a request without a body completes at once
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._phase = _IDLE
        super().on_message_complete()

    # -- timers ---------------------------------------------------------------------------
    def _start_head(self) -> None:
        self._phase, self._deadline, self._head_seen, self._head_bytes = _HEAD, None, False, 0

    def _sync_timer(self) -> None:
        """Arm the timer for the current phase's deadline, or cancel it when idle."""
        wanted = None if self._phase == _IDLE else self._deadline
        if wanted == self._timer_deadline:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_deadline = wanted
        self._timer = None if wanted is None else self.loop.call_at(wanted, self._on_deadline)

    def _on_deadline(self) -> None:
        self._timer = self._timer_deadline = None
        if self.transport.is_closing() or self._phase == _IDLE:
            return
        if self._phase == _HEAD and self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head waits while the previous response is produced (reading is paused):
            # not the client's fault, so its clock starts again.
            self._deadline = self.loop.time() + self.guard.header_timeout
            self._sync_timer()
            return
        if self._phase == _HEAD:
            message = f"the request head did not arrive within {self.guard.header_timeout:g} s"
            self._cut_off("header_timeout", 408 if self._head_seen else None, "request_timeout", message)
        else:
            self._cut_off("body_timeout", 408, "request_timeout", f"the request body did not arrive within {self.guard.body_timeout:g} s")

    def _cut_off(self, reason: str, status: int | None, code: str, message: str) -> None:
        """Answer ``status`` unless this request was already answered or a response is under way, and close."""
        self.guard.note(reason)
        cycle = self.cycle
        if cycle is not None and cycle.response_complete and self._phase == _BODY:
            status = None  # answered early (413 from the head): the client has its one answer
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started or self._phase != _BODY:  # never write into another response
                status = None
            cycle.disconnected = True  # the app's receive() now returns http.disconnect, its send() is a no-op
            cycle.message_event.set()
        self._phase = _IDLE
        if status is not None:
            self.transport.write(_error_response(status, code, message, self.server_state.default_headers))
        self.transport.close()


class InvalidRequestLogThrottle(logging.Filter):
    """Lets uvicorn's "Invalid HTTP request received." through at most once per :data:`LOG_EVERY`
    seconds, the next one saying how many were left out: uvicorn logs it once per bad request, and
    a flood of garbage must not become a flood of log lines. Other records pass untouched."""

    MESSAGE = "Invalid HTTP request received."

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._clock = clock
        self._next = 0.0
        self._suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != self.MESSAGE:
            return True
        now = self._clock()
        if now < self._next:
            self._suppressed += 1
            return False
        self._next = now + LOG_EVERY
        if self._suppressed:
            record.msg = f"{self.MESSAGE} ({self._suppressed} more since the last report, not logged; next report in {LOG_EVERY:.0f} s at the earliest)"
            self._suppressed = 0
        return True


_invalid_request_throttle = InvalidRequestLogThrottle()


def guarded_protocol(guard: ConnectionGuard) -> type[GuardedHttpToolsProtocol]:
    """A protocol class bound to one server's guard, for ``uvicorn.Config(http=...)``; installs
    :class:`InvalidRequestLogThrottle` on uvicorn's logger (once per process)."""
    uvicorn_log = logging.getLogger("uvicorn.error")
    if _invalid_request_throttle not in uvicorn_log.filters:
        uvicorn_log.addFilter(_invalid_request_throttle)
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"guard": guard})


class GatewayServer(uvicorn.Server):
    """uvicorn's server that calls ``on_ready`` once the app has started and the socket accepts."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.on_ready = on_ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and not self.should_exit and self.on_ready is not None:
            self.on_ready()


def server_config(app: Any, settings: ConnectionSettings, max_connections: int, registry: CollectorRegistry | None = None, **options: Any) -> uvicorn.Config:
    """uvicorn's configuration with the guarded protocol; ``options`` go to ``uvicorn.Config``."""
    guard = ConnectionGuard(settings, max_connections, registry)
    defaults: dict[str, Any] = {"log_config": None, "access_log": False, "server_header": False, "ws": "none"}
    return uvicorn.Config(app, http=guarded_protocol(guard), timeout_keep_alive=settings.keep_alive_timeout, **{**defaults, **options})  # type: ignore[arg-type]


def serve(
    app: Any,
    sock: socket.socket,
    settings: ConnectionSettings,
    file_limit: FileLimit,
    pools: Mapping[str, int],
    *,
    registry: CollectorRegistry | None = None,
    on_ready: Callable[[], None] | None = None,
) -> bool:
    """Serve ``app`` on the bound ``sock`` until SIGINT or SIGTERM; False if it never started.
    ``pools``: the most connections each outbound pool can open (:func:`outbound_pools`)."""
    reserve = file_reserve(pools)
    cap = connection_cap(settings, file_limit.soft, reserve)
    raised = f" (raised from {file_limit.before})" if file_limit.soft != file_limit.before else ""
    source = "listen.max_connections" if settings.max_connections else f"open-files limit - {reserve} reserved, at least {MIN_CAP}, at most {CAP_CEILING}"
    log.info(
        "open-files limit %d%s; client connections at most %d (%s); request head within %g s, body within %g s, idle keep-alive %g s",
        file_limit.soft,
        raised,
        cap,
        source,
        settings.header_timeout,
        settings.body_timeout,
        settings.keep_alive_timeout,
    )
    if cap + reserve > file_limit.soft:
        detail = ", ".join(f"{name} {size}" for name, size in pools.items())
        log.warning(
            "%d client connections and %d files kept for outbound connections (%s) and the rest (%d) exceed the open-files limit %d: "
            "under load, connections may fail with 'too many open files'; raise the hard limit (ulimit -Hn, LimitNOFILE= in systemd)%s",
            cap,
            reserve,
            detail,
            BASE_RESERVE,
            file_limit.soft,
            " or lower listen.max_connections" if settings.max_connections else "",
        )
    server = GatewayServer(server_config(app, settings, cap, registry, timeout_graceful_shutdown=15), on_ready)
    server.run(sockets=[sock])
    return server.started
