"""YAML configuration with ``${VAR}`` / ``${VAR:-default}`` interpolation, into typed settings.

Every error names the file, the key and the fix, and unknown keys are refused (a typo
would otherwise silently fall back to a default).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from gateway.tasks import IMAGE_FORMATS, Category

CONFIG_ENV = "GATEWAY_CONFIG"
ENGINE_CODE_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_MISSING: Any = object()
OPTIONAL_VARIABLE_KEYS = frozenset({"portal.webhook"})
"""Keys only some commands need: an unset ``${VAR}`` there leaves the key unset instead of
failing every command (``engines list`` needs no portal; ``--portal`` can stand in)."""
ENGINE_CONTEXT_MODES = ("always", "when_requested")


class ConfigError(Exception):
    def __init__(self, file: str | os.PathLike[str], key: str, problem: str, fix: str = "") -> None:
        self.file, self.key, self.problem, self.fix = str(file), key, problem, fix
        text = f"{self.file}: {key}: {problem}" if key else f"{self.file}: {problem}"
        super().__init__(f"{text}. Fix: {fix}" if fix else text)


QUEUE_BACKENDS = ("sqlite", "postgres")
POSTGRES_DSN_EXAMPLE = "postgresql://gateway:password@db.example.com:5432/gateway"


@dataclass(frozen=True)
class QueueSettings:
    backend: str = "sqlite"
    path: Path = Path("var/queue.sqlite3")
    """The SQLite file (``backend: sqlite``)."""
    dsn: str = ""
    """The PostgreSQL database every node shares (``backend: postgres``): jobs, engine tokens, hosted files."""
    pool_size: int = 20
    """PostgreSQL connections this process may open (plus one that listens for new jobs): accepts,
    model slots and deliveries share them, so keep it near ``workers.concurrency``."""
    connect_timeout: float = 5.0
    """Seconds to wait for a PostgreSQL connection before an accept answers 503."""
    lease_seconds: float = 30.0
    """A claimed job whose worker stops renewing it for this long is taken up again."""
    poll_interval: float = 0.5
    """Seconds between claims when nothing wakes the worker: SQLite's processes share no signal; with
    PostgreSQL, LISTEN/NOTIFY wakes workers at once and this poll (5 s by default) is a safety net."""
    retention_days: float = 7.0
    """Jobs in a final state are deleted this long after they ended (``gateway jobs`` history)."""

    @property
    def location(self) -> str:
        """Where jobs are stored, safe to print: a DSN without its user and password."""
        if self.backend == "postgres":
            url = urlsplit(self.dsn)
            return f"PostgreSQL {url.netloc.rpartition('@')[2]}{url.path}"
        return str(self.path)


@dataclass(frozen=True)
class SecuritySettings:
    allowed_portals: tuple[str, ...] = ()
    allow_private_networks: bool = False


@dataclass(frozen=True)
class RoutingSettings:
    retries: int = 2
    backoff_initial: float = 0.5
    backoff_max: float = 8.0
    cooldown_failures: int = 3
    cooldown_seconds: float = 30.0
    deadline_margin: float = 15.0
    """Seconds kept before the job's ttl for the error callback; capped at a quarter of the ttl."""


@dataclass(frozen=True)
class DeliverySettings:
    connect_timeout: float = 5.0
    read_timeout: float = 15.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    max_in_flight_per_portal: int = 8
    """Callback POSTs in flight at once to one portal host: a slow or hung portal holds at most
    this many, and the others' callbacks go on in their own lanes."""


@dataclass(frozen=True)
class ProviderConfig:
    name: str
    type: str
    options: Mapping[str, Any]


@dataclass(frozen=True)
class RouteTarget:
    provider: str
    model: str
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.provider}/{self.model}"


DEFAULT_IMAGE_SIZES = dict(zip(IMAGE_FORMATS, ("1024x1024", "1024x1792", "1792x1024"), strict=True))
"""The size requested for each of the portal's image formats, unless an engine's ``image.sizes`` says otherwise."""
_SIZE_RE = re.compile(r"^\d{2,5}x\d{2,5}$")


@dataclass(frozen=True)
class EngineConfig:
    code: str
    name: str
    category: Category
    token: str | None
    route: tuple[RouteTarget, ...]
    settings: Mapping[str, Any] = field(default_factory=dict)
    image_sizes: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_IMAGE_SIZES))
    """Image engines: the size requested for each of the portal's formats."""
    max_images: int = 1
    """Image engines: the most pictures one request may ask for (``images_number`` is capped)."""
    context: str = "when_requested"
    """Text engines: when the portal's ``context`` (earlier messages) goes to the model: ``always``, or
    ``when_requested`` -- only if the request says ``collect_context: true``, as the portal's own engines do."""


@dataclass(frozen=True)
class FilesSettings:
    retention_days: float = 30.0
    """Hosted images are deleted this long after they were generated."""
    max_bytes: int = 20 * 1024 * 1024
    """The largest picture the gateway downloads from a provider."""


@dataclass(frozen=True)
class RecordingSettings:
    """How ``audio`` and ``call`` recordings are downloaded from the portal (key ``audio``)."""

    max_bytes: int = 100 * 1024 * 1024
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    """Seconds without a byte from the portal before the download counts as failed."""
    max_redirects: int = 5


@dataclass(frozen=True)
class ConnectionSettings:
    """How the HTTP server treats client connections (keys under ``listen``): a client that holds a
    connection without finishing its request is cut off, and connections stay below the file limit."""

    header_timeout: float = 10.0
    """Seconds a connection may take to send a complete request head; then it is closed (408)."""
    body_timeout: float = 30.0
    """Seconds, from the end of the head, for the request body to arrive; then 408 and closed."""
    keep_alive_timeout: float = 5.0
    """Seconds an idle keep-alive connection stays open between requests."""
    max_connections: int | None = None
    """Open client connections at most; beyond it new ones get 503 with ``Retry-After``.
    None: derived from the open-files limit at start (``gateway.server.connection_cap``)."""


@dataclass(frozen=True)
class ApiKeyConfig:
    """One key of the OpenAI-compatible API (``api_keys:``): who holds it, what it may use, how much."""

    name: str
    secret: str
    """``sha256:<64 hex>`` (the key's SHA-256, so the config holds no key) or the key itself (``${VAR}``)."""
    engines: tuple[str, ...]
    """Engine codes this key may use (the ``model`` a client sends); ``*`` for every engine."""
    requests_per_minute: int | None = None
    tokens_per_day: int | None = None


@dataclass(frozen=True)
class OpenAIApiSettings:
    """Bounds of the OpenAI-compatible API's requests (key ``openai_api``)."""

    timeout: float = 300.0
    """Seconds one request may take, waiting for a model slot and streaming included."""
    max_body_bytes: int = 4 * 1024 * 1024
    """The largest JSON body (chat completions, image generations)."""
    max_upload_bytes: int = 25 * 1024 * 1024
    """The largest transcription upload (OpenAI's own limit is 25 MB)."""
    max_messages: int = 256
    max_message_chars: int = 262144
    """Characters of one message's content."""


DEFAULT_OAUTH_SERVERS = ("oauth.bitrix.info", "oauth.bitrix24.tech")


@dataclass(frozen=True)
class TenantLimits:
    """What one installed portal may use (``app.limits``); None: no limit."""

    requests_per_minute: int | None = None
    concurrent_jobs: int | None = None
    audio_minutes_per_day: float | None = None


@dataclass(frozen=True)
class LocalAppCredentials:
    """A local app's OAuth pair, valid on one portal only and shown there after the app is saved:
    entered after the install (``app.local_apps``) so the gateway can refresh that portal's tokens."""

    domain: str
    client_id: str
    client_secret: str


@dataclass(frozen=True)
class AppSettings:
    """Bitrix24 app mode (key ``app``): portals install the app and get the engines by themselves."""

    engines: tuple[str, ...]
    """Codes (from ``engines:``) registered on every portal that installs the app."""
    client_id: str = ""
    """A Marketplace app's pair, valid on every portal; empty for local apps only."""
    client_secret: str = ""
    code: str = ""
    """The app's code (the engines' ``app_code`` on the portal); default: ``client_id``."""
    local_apps: tuple[LocalAppCredentials, ...] = ()
    oauth_servers: tuple[str, ...] = DEFAULT_OAUTH_SERVERS
    """Hosts trusted as a portal's ``server_endpoint`` (``app.info``, token refresh): an install
    event names its OAuth server, and a forged one must not make the gateway call anywhere else."""
    limits: TenantLimits = TenantLimits()

    def credentials_for(self, domain: str) -> tuple[str, str] | None:
        """The OAuth pair that refreshes this portal's tokens: its local app's, else the Marketplace app's."""
        for local in self.local_apps:
            if local.domain.lower() == domain.lower():
                return local.client_id, local.client_secret
        return (self.client_id, self.client_secret) if self.client_id else None


ADMIN_USER_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
ADMIN_HASH_RE = re.compile(r"^scrypt\$\d{1,8}\$\d{1,3}\$\d{1,3}\$[A-Za-z0-9+/=]{16,64}\$[A-Za-z0-9+/=]{32,128}$")
"""A password hash as ``gateway admin hash-password`` prints it: ``scrypt$N$r$p$salt$hash`` (base64)."""
MIN_ADMIN_PASSWORD = 12
MIN_SESSION_SECRET = 32


@dataclass(frozen=True)
class AdminUser:
    name: str
    password: str
    """A hash (``scrypt$...``) or the password itself (best from ``${VAR}``), hashed in memory at start."""


@dataclass(frozen=True)
class AdminSettings:
    """The admin dashboard (key ``admin``); absent: the dashboard is off."""

    users: tuple[AdminUser, ...]
    session_hours: float = 12.0
    """A login lasts this long; then the user logs in again."""
    session_secret: str = ""
    """Signs session cookies; empty: a random key kept in ``data_dir/admin-session.key`` (one machine's
    processes share it; nodes behind one load balancer need the same ``session_secret``)."""


@dataclass(frozen=True)
class Config:
    path: Path
    public_url: str = "http://127.0.0.1:8080"
    host: str = "127.0.0.1"
    port: int = 8080
    connections: ConnectionSettings = ConnectionSettings()
    data_dir: Path = Path("var")
    """Absolute once loaded: a relative ``data_dir`` (or ``queue.path``) is taken from the config file's folder."""
    queue: QueueSettings = QueueSettings()
    concurrency: int = 16
    shutdown_grace: float = 10.0
    """Seconds running jobs get to finish on shutdown before they are handed back to the queue."""
    max_body_bytes: int = 1024 * 1024
    default_ttl: int = 14400
    security: SecuritySettings = SecuritySettings()
    files: FilesSettings = FilesSettings()
    audio: RecordingSettings = RecordingSettings()
    routing: RoutingSettings = RoutingSettings()
    delivery: DeliverySettings = DeliverySettings()
    providers: Mapping[str, ProviderConfig] = field(default_factory=dict)
    engines: tuple[EngineConfig, ...] = ()
    portal_webhook: str | None = None
    """Inbound webhook (scope ai_admin) used by `gateway engines register/remote/unregister`."""
    portal_webhook_variable: str | None = None
    """The environment variable ``portal.webhook`` names when it is not set (reported by the commands that need it)."""
    portal_retries: int = 4
    portal_backoff: float = 1.0
    api_keys: tuple[ApiKeyConfig, ...] = ()
    """Keys of the OpenAI-compatible API (``/v1``); none: the API is off."""
    openai_api: OpenAIApiSettings = field(default_factory=lambda: OpenAIApiSettings())
    app: AppSettings | None = None
    """App mode (``app:``); None: webhook mode only."""
    admin: AdminSettings | None = None
    """The admin dashboard (``admin:``); None: off."""

    def engine(self, code: str) -> EngineConfig | None:
        return next((e for e in self.engines if e.code == code), None)


class _Section:
    """A mapping being read, remembering its key path for error messages."""

    def __init__(self, file: Path, path: str, data: Any) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(file, path, f"must be a mapping, got {type(data).__name__}", "write `key: value` lines under it")
        self.file, self.path, self.data = file, path, data
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def raw(self, name: str, default: Any = _MISSING) -> Any:
        self.seen.add(name)
        if name not in self.data or self.data[name] is None:
            if default is _MISSING:
                raise ConfigError(self.file, self.key(name), "is required", f"add `{name}:` under `{self.path or 'the top level'}`")
            return default
        return self.data[name]

    def text(self, name: str, default: Any = _MISSING) -> Any:
        value = self.raw(name, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(self.file, self.key(name), f"must be a string, got {type(value).__name__}", "quote the value")
        return str(value)

    def number(self, name: str, default: Any, *, minimum: float = 0, integer: bool = False) -> Any:
        value = self.raw(name, default)
        try:
            number = int(value) if integer else float(value)
            if integer and isinstance(value, float) and not value.is_integer():
                raise ValueError
        except (TypeError, ValueError):
            kind = "a whole number" if integer else "a number"
            raise ConfigError(self.file, self.key(name), f"must be {kind}, got {value!r}", f"write {kind} such as {default}") from None
        if number < minimum:
            raise ConfigError(self.file, self.key(name), f"must be at least {minimum}, got {number}", f"use a value >= {minimum}")
        return number

    def bool(self, name: str, default: bool) -> bool:
        value = self.raw(name, default)
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"  # an interpolated ${VAR} is a string
        if not isinstance(value, bool):
            raise ConfigError(self.file, self.key(name), f"must be true or false, got {value!r}", "write true or false")
        return value

    def section(self, name: str) -> _Section:
        return _Section(self.file, self.key(name), self.raw(name, {}))

    def done(self) -> None:
        unknown = [k for k in self.data if k not in self.seen]
        if unknown:
            name = str(unknown[0])
            close = difflib.get_close_matches(name, sorted(self.seen), n=1)
            fix = f"did you mean `{close[0]}`?" if close else f"remove it; known keys here: {', '.join(sorted(self.seen))}"
            raise ConfigError(self.file, self.key(name), "is not a known setting", fix)


def interpolate(value: Any, file: Path, path: str = "", environ: Mapping[str, str] | None = None) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string of a parsed YAML tree."""
    env = os.environ if environ is None else environ
    if isinstance(value, Mapping):
        return {k: interpolate(v, file, f"{path}.{k}" if path else str(k), env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, file, f"{path}[{i}]", env) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value
    unset: list[str] = []

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        if path in OPTIONAL_VARIABLE_KEYS:
            unset.append(name)
            return ""
        raise ConfigError(file, path, f"environment variable {name} is not set", f"export {name}=... or write ${{{name}:-default}}")

    text = _VAR_RE.sub(substitute, value)
    return UnsetVariable(unset[0]) if unset else text


@dataclass(frozen=True)
class UnsetVariable:
    """The value of an optional key (``OPTIONAL_VARIABLE_KEYS``) whose ``${VAR}`` is not set."""

    name: str


def _resolve_path(base: Path, value: str) -> Path:
    """A relative path in the config is relative to the config file's folder, not to the current
    directory: every command run on the same config, from any folder, finds the same data."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path(os.path.normpath(base / path))


def find_config_path(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    return Path("gateway.yaml")


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(file, "", "file not found", f"pass --config PATH, set {CONFIG_ENV}, or copy examples/gateway.yaml to ./gateway.yaml") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(file, "", f"is not valid YAML{where}", "check indentation and quoting there") from None
    return parse_config(interpolate(data or {}, file, environ=environ), file)


def parse_config(data: Any, file: Path) -> Config:
    top = _Section(file, "", data)
    public_url = top.text("public_url", "http://127.0.0.1:8080").rstrip("/")
    parts = urlsplit(public_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            file, "public_url", f"{public_url!r} is not an http(s) URL", "write the URL portals use to reach the gateway, e.g. https://gw.example.com"
        )
    listen = top.section("listen")
    host = listen.text("host", "127.0.0.1")
    port = listen.number("port", 8080, integer=True)
    connections = ConnectionSettings(
        header_timeout=listen.number("header_timeout", 10.0, minimum=0.1),
        body_timeout=listen.number("body_timeout", 30.0, minimum=0.1),
        keep_alive_timeout=listen.number("keep_alive_timeout", 5.0, minimum=0.1),
        max_connections=listen.number("max_connections", 0, integer=True) or None,  # 0 or absent: from the file limit
    )
    listen.done()
    base = Path(os.path.abspath(file)).parent
    data_dir = _resolve_path(base, top.text("data_dir", "var"))

    queue = _parse_queue(top.section("queue"), base, data_dir)

    workers = top.section("workers")
    concurrency = workers.number("concurrency", 16, minimum=1, integer=True)
    shutdown_grace = workers.number("shutdown_grace", 10.0)
    workers.done()

    limits = top.section("limits")
    max_body_bytes = limits.number("max_body_bytes", 1024 * 1024, minimum=1024, integer=True)
    default_ttl = limits.number("default_ttl", 14400, minimum=1, integer=True)
    limits.done()

    sec = top.section("security")
    portals = sec.raw("allowed_portals", [])
    if isinstance(portals, str):
        portals = [p.strip() for p in portals.split(",") if p.strip()]
    if not isinstance(portals, list) or not all(isinstance(p, str) and p for p in portals):
        raise ConfigError(file, "security.allowed_portals", "must be a list of host names", 'write e.g. [acme.bitrix24.com, "*.bitrix24.de"]')
    security = SecuritySettings(tuple(p.lower() for p in portals), sec.bool("allow_private_networks", False))
    sec.done()

    f = top.section("files")
    files = FilesSettings(f.number("retention_days", 30.0), f.number("max_bytes", 20 * 1024 * 1024, minimum=1024, integer=True))
    f.done()

    a = top.section("audio")
    audio = RecordingSettings(
        max_bytes=a.number("max_bytes", 100 * 1024 * 1024, minimum=1024, integer=True),
        connect_timeout=a.number("connect_timeout", 10.0, minimum=0.1),
        read_timeout=a.number("read_timeout", 60.0, minimum=0.1),
        max_redirects=a.number("max_redirects", 5, integer=True),
    )
    a.done()

    r = top.section("routing")
    routing = RoutingSettings(
        retries=r.number("retries", 2, integer=True),
        backoff_initial=r.number("backoff_initial", 0.5),
        backoff_max=r.number("backoff_max", 8.0),
        cooldown_failures=r.number("cooldown_failures", 3, minimum=1, integer=True),
        cooldown_seconds=r.number("cooldown_seconds", 30.0),
        deadline_margin=r.number("deadline_margin", 15.0),
    )
    r.done()

    d = top.section("delivery")
    delivery = DeliverySettings(
        connect_timeout=d.number("connect_timeout", 5.0, minimum=0.1),
        read_timeout=d.number("read_timeout", 15.0, minimum=0.1),
        backoff_initial=d.number("backoff_initial", 1.0, minimum=0.01),
        backoff_max=d.number("backoff_max", 60.0, minimum=0.01),
        max_in_flight_per_portal=d.number("max_in_flight_per_portal", 8, integer=True, minimum=1),
    )
    d.done()

    portal = top.section("portal")
    webhook = portal.raw("webhook", None)
    portal_webhook_variable = webhook.name if isinstance(webhook, UnsetVariable) else None
    portal_webhook = None if portal_webhook_variable else (portal.text("webhook", None) or None)
    portal_retries = portal.number("retries", 4, integer=True)
    portal_backoff = portal.number("backoff", 1.0)
    portal.done()
    providers = _parse_providers(top.section("providers"))
    engines = _parse_engines(file, top.raw("engines", []), providers)
    api_keys = _parse_api_keys(file, top.raw("api_keys", []), engines)
    openai_api = _parse_openai_api(top.section("openai_api"))
    app = _parse_app(top.section("app"), engines) if top.raw("app", None) is not None else None
    admin = _parse_admin(top.section("admin")) if top.raw("admin", None) is not None else None
    top.done()
    return Config(
        path=file,
        public_url=public_url,
        host=host,
        port=port,
        connections=connections,
        data_dir=data_dir,
        queue=queue,
        concurrency=concurrency,
        shutdown_grace=shutdown_grace,
        max_body_bytes=max_body_bytes,
        default_ttl=default_ttl,
        security=security,
        files=files,
        audio=audio,
        routing=routing,
        delivery=delivery,
        providers=providers,
        engines=engines,
        portal_webhook=portal_webhook,
        portal_webhook_variable=portal_webhook_variable,
        portal_retries=portal_retries,
        portal_backoff=portal_backoff,
        api_keys=api_keys,
        openai_api=openai_api,
        app=app,
        admin=admin,
    )


def _admin_password(file: Path, key: str, value: str) -> str:
    """A password hash as printed by ``gateway admin hash-password``, or a plain password long enough; never echoed."""
    if value.startswith("scrypt$"):
        if not ADMIN_HASH_RE.fullmatch(value):
            raise ConfigError(file, key, "is not a complete scrypt hash", "paste the whole line `gateway admin hash-password` prints")
        return value
    if len(value) < MIN_ADMIN_PASSWORD:
        raise ConfigError(
            file,
            key,
            f"is shorter than {MIN_ADMIN_PASSWORD} characters",
            'use a long password from an environment variable ("${GATEWAY_ADMIN_PASSWORD}"), or its hash from `gateway admin hash-password`',
        )
    return value


def _parse_admin(a: _Section) -> AdminSettings:
    """``admin: {password: ...}`` (user ``admin``) or ``admin: {users: [{name, password}]}``."""
    file = a.file
    users: list[AdminUser] = []
    single = a.raw("password", None)
    listed = a.raw("users", None)
    if (single is None) == (listed is None):
        raise ConfigError(
            file, "admin", "needs either `password` or `users`", 'write `admin: {password: "${GATEWAY_ADMIN_PASSWORD}"}`, or a list under `users:`'
        )
    if single is not None:
        users.append(AdminUser("admin", _admin_password(file, a.key("password"), a.text("password"))))
    else:
        if not isinstance(listed, list) or not listed:
            raise ConfigError(file, a.key("users"), "must be a non-empty list", 'write `- {name: alice, password: "${ALICE_PASSWORD}"}`')
        for i, item in enumerate(listed):
            u = _Section(file, f"{a.key('users')}[{i}]", item)
            name = u.text("name")
            if not ADMIN_USER_RE.fullmatch(name):
                raise ConfigError(file, u.key("name"), f"{name[:64]!r} may use only letters, digits, _ . @ and - (at most 64)", "rename the user")
            if any(other.name == name for other in users):
                raise ConfigError(file, u.key("name"), f"user {name!r} is listed twice", "give each user one entry")
            users.append(AdminUser(name, _admin_password(file, u.key("password"), u.text("password"))))
            u.done()
    session_hours = a.number("session_hours", 12.0, minimum=0.05)
    secret = a.text("session_secret", "")
    if secret and len(secret) < MIN_SESSION_SECRET:
        raise ConfigError(
            file,
            a.key("session_secret"),
            f"is shorter than {MIN_SESSION_SECRET} characters",
            'generate one: python -c "import secrets; print(secrets.token_urlsafe(48))", and give every node the same',
        )
    a.done()
    return AdminSettings(tuple(users), session_hours, secret)


def _parse_app(a: _Section, engines: tuple[EngineConfig, ...]) -> AppSettings:
    known = {engine.code for engine in engines}
    raw_engines = a.raw("engines")
    if not isinstance(raw_engines, list) or not raw_engines:
        raise ConfigError(a.file, "app.engines", "must be a list of engine codes", "list the codes (from `engines:`) every installing portal gets")
    codes: list[str] = []
    for i, code in enumerate(raw_engines):
        if not isinstance(code, str) or code not in known:
            raise ConfigError(a.file, f"app.engines[{i}]", f"{code!r} is not an engine of this config", f"use one of: {', '.join(sorted(known)) or 'none'}")
        codes.append(code)
    client_id, client_secret = a.text("client_id", ""), a.text("client_secret", "")
    if bool(client_id) != bool(client_secret):
        missing = "client_secret" if client_id else "client_id"
        raise ConfigError(a.file, f"app.{missing}", "is required with the other one", "copy both from the app's settings in the Bitrix24 developer console")
    local_apps: list[LocalAppCredentials] = []
    raw_local = a.raw("local_apps", [])
    if not isinstance(raw_local, list):
        raise ConfigError(a.file, "app.local_apps", "must be a list", "write `- {domain: acme.bitrix24.com, client_id: local..., client_secret: ...}` items")
    for i, item in enumerate(raw_local):
        entry = _Section(a.file, f"app.local_apps[{i}]", item)
        local_apps.append(LocalAppCredentials(entry.text("domain").strip().lower(), entry.text("client_id"), entry.text("client_secret")))
        entry.done()
    servers = a.raw("oauth_servers", list(DEFAULT_OAUTH_SERVERS))
    if not isinstance(servers, list) or not all(isinstance(host, str) and host for host in servers):
        raise ConfigError(a.file, "app.oauth_servers", "must be a list of host names", f"the default is {', '.join(DEFAULT_OAUTH_SERVERS)}")
    limits_section = a.section("limits")
    rpm = limits_section.number("requests_per_minute", 0, integer=True)
    concurrent = limits_section.number("concurrent_jobs", 0, integer=True)
    audio = limits_section.number("audio_minutes_per_day", 0)
    limits_section.done()
    settings = AppSettings(
        engines=tuple(codes),
        client_id=client_id,
        client_secret=client_secret,
        code=a.text("code", ""),
        local_apps=tuple(local_apps),
        oauth_servers=tuple(host.strip().lower() for host in servers),
        limits=TenantLimits(rpm or None, concurrent or None, audio or None),
    )
    a.done()
    return settings


def _parse_queue(q: _Section, base: Path, data_dir: Path) -> QueueSettings:
    backend = q.text("backend", "sqlite")
    if backend not in QUEUE_BACKENDS:
        raise ConfigError(
            q.file, "queue.backend", f"unknown backend {backend!r}", "use `sqlite` (embedded, one machine) or `postgres` (many nodes, with `dsn:`)"
        )
    common: dict[str, Any] = {
        "lease_seconds": q.number("lease_seconds", 30.0, minimum=1),
        "retention_days": q.number("retention_days", 7.0),
    }
    if backend == "sqlite":
        settings = QueueSettings(
            backend=backend,
            path=_resolve_path(base, q.text("path", str(data_dir / "queue.sqlite3"))),
            poll_interval=q.number("poll_interval", 0.5, minimum=0.01),
            **common,
        )
    else:
        settings = QueueSettings(
            backend=backend,
            dsn=check_postgres_dsn(q.file, "queue.dsn", q.text("dsn")),
            pool_size=q.number("pool_size", 20, minimum=2, integer=True),
            connect_timeout=q.number("connect_timeout", 5.0, minimum=0.1),
            poll_interval=q.number("poll_interval", 5.0, minimum=0.01),
            **common,
        )
    q.done()
    return settings


def check_postgres_dsn(file: Path, key: str, dsn: str) -> str:
    """A PostgreSQL URL the driver can use, checked here so that a typo is a config error at start,
    not a 503 on every accept. The message never repeats the DSN: it may hold a password."""
    fix = f"write a URL such as {POSTGRES_DSN_EXAMPLE} (or ${{GATEWAY_QUEUE_DSN}})"
    try:
        url = urlsplit(dsn.strip())
    except ValueError as exc:
        raise ConfigError(file, key, f"is not a valid PostgreSQL URL ({exc})", fix) from None
    if url.scheme not in ("postgresql", "postgres"):
        raise ConfigError(file, key, f"must start with postgresql:// (got {url.scheme + '://' if url.scheme else 'no scheme'})", fix)
    # Several hosts (``h1:5432,h2:5432``) are allowed: the driver tries them in turn (failover).
    for host in url.netloc.rpartition("@")[2].split(","):
        try:
            port = urlsplit(f"//{host}").port
        except ValueError:
            raise ConfigError(file, key, "has a port that is not a number from 1 to 65535", fix) from None
        if port == 0:
            raise ConfigError(file, key, "has port 0", fix)
    if not url.hostname and "host=" not in url.query:
        raise ConfigError(file, key, "names no host", fix)
    return dsn.strip()


def _parse_providers(section: _Section) -> dict[str, ProviderConfig]:
    providers = {}
    for name in list(section.data):
        entry = section.section(str(name))
        kind = entry.text("type")
        options = {k: v for k, v in entry.data.items() if k != "type"}
        providers[str(name)] = ProviderConfig(str(name), kind, options)
    section.done()
    return providers


def _parse_engines(file: Path, raw: Any, providers: Mapping[str, ProviderConfig]) -> tuple[EngineConfig, ...]:
    if not isinstance(raw, list):
        raise ConfigError(file, "engines", "must be a list", "write each engine as `- code: ...`")
    engines: list[EngineConfig] = []
    for i, item in enumerate(raw):
        e = _Section(file, f"engines[{i}]", item)
        code = e.text("code")
        if not ENGINE_CODE_RE.fullmatch(code):
            raise ConfigError(file, e.key("code"), f"{code!r} may use only letters, digits, _ and -", "rename the engine (the portal enforces the same rule)")
        if any(other.code.lower() == code.lower() for other in engines):
            raise ConfigError(file, e.key("code"), f"engine code {code!r} is used twice", "give each engine its own code")
        category = e.text("category")
        try:
            cat = Category(category)
        except ValueError:
            raise ConfigError(file, e.key("category"), f"unknown category {category!r}", "use one of text, image, audio, call") from None
        token = e.text("token", None)
        if token is not None and len(token) < 16:
            raise ConfigError(file, e.key("token"), "is shorter than 16 characters", "use a long random token, or leave it out to have one generated")
        route_raw = e.raw("route")
        if not isinstance(route_raw, list) or not route_raw:
            raise ConfigError(file, e.key("route"), "must be a non-empty list of targets", "write `- {provider: NAME, model: MODEL}`")
        route = []
        for j, target_raw in enumerate(route_raw):
            t = _Section(file, f"{e.key('route')}[{j}]", target_raw)
            provider = t.text("provider")
            if provider not in providers:
                raise ConfigError(
                    file, t.key("provider"), f"no provider named {provider!r}", f"define it under `providers:` (defined: {', '.join(providers) or 'none'})"
                )
            params = t.raw("params", {})
            if not isinstance(params, Mapping):
                raise ConfigError(file, t.key("params"), "must be a mapping", "write e.g. {temperature: 0.2}")
            route.append(RouteTarget(provider, t.text("model"), dict(params)))
            t.done()
        settings = e.raw("settings", {})
        if not isinstance(settings, Mapping):
            raise ConfigError(file, e.key("settings"), "must be a mapping", "write e.g. {code_alias: ChatGPT}")
        image = e.section("image")
        sizes = dict(DEFAULT_IMAGE_SIZES)
        sizes_section = image.section("sizes")
        for fmt in DEFAULT_IMAGE_SIZES:
            size = sizes_section.text(fmt, DEFAULT_IMAGE_SIZES[fmt])
            if not _SIZE_RE.fullmatch(size):
                raise ConfigError(file, sizes_section.key(fmt), f"{size!r} is not WIDTHxHEIGHT", "write e.g. 1024x1024")
            sizes[fmt] = size
        sizes_section.done()
        max_images = image.number("max_images", 1, minimum=1, integer=True)
        image.done()
        context = e.text("context", "when_requested")
        if context not in ENGINE_CONTEXT_MODES:
            raise ConfigError(
                file,
                e.key("context"),
                f"unknown value {context!r}",
                "use `when_requested` (earlier messages reach the model only when the request says collect_context: true, "
                "as with the portal's own engines) or `always`",
            )
        engines.append(EngineConfig(code, e.text("name", code), cat, token, tuple(route), dict(settings), sizes, max_images, context=context))
        e.done()
    return tuple(engines)


API_KEY_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_HASHED_SECRET_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
MIN_API_KEY_LENGTH = 20


def _parse_api_keys(file: Path, raw: Any, engines: tuple[EngineConfig, ...]) -> tuple[ApiKeyConfig, ...]:
    """``api_keys:``: each key's name, secret (hashed or plain), engines and limits; never echoes a secret in an error."""
    if not isinstance(raw, list):
        raise ConfigError(file, "api_keys", "must be a list", 'write each key as `- {name: NAME, secret: "${VAR}", engines: [CODE]}`')
    codes = {e.code for e in engines}
    keys: list[ApiKeyConfig] = []
    for i, item in enumerate(raw):
        k = _Section(file, f"api_keys[{i}]", item)
        name = k.text("name")
        if not API_KEY_NAME_RE.fullmatch(name):
            raise ConfigError(file, k.key("name"), f"{name[:64]!r} may use only letters, digits, _ . and - (at most 64)", "rename the key")
        if any(other.name == name for other in keys):
            raise ConfigError(file, k.key("name"), f"key name {name!r} is used twice", "give each key its own name")
        secret = k.text("secret").strip()
        if secret.lower().startswith("sha256:"):
            if not _HASHED_SECRET_RE.fullmatch(secret.lower()):
                raise ConfigError(
                    file, k.key("secret"), "a hashed secret must be `sha256:` and 64 hex digits", 'write the output of `printf %s "$KEY" | sha256sum`'
                )
            secret = secret.lower()
        elif len(secret) < MIN_API_KEY_LENGTH:
            raise ConfigError(
                file,
                k.key("secret"),
                f"key {name!r} is shorter than {MIN_API_KEY_LENGTH} characters",
                "generate one: python -c \"import secrets; print('sk-gw-' + secrets.token_urlsafe(32))\"; keep it in an environment variable (${VAR}) or write its sha256",
            )
        allowed = k.raw("engines")
        if isinstance(allowed, str):
            allowed = [allowed]
        if not isinstance(allowed, list) or not allowed or not all(isinstance(c, str) for c in allowed):
            raise ConfigError(file, k.key("engines"), "must be a non-empty list of engine codes", 'write e.g. [acme_text], or ["*"] for every engine')
        for code in allowed:
            if code != "*" and code not in codes:
                raise ConfigError(
                    file, k.key("engines"), f"no engine with code {code!r}", f'use codes from `engines:` ({", ".join(sorted(codes)) or "none"}) or "*"'
                )
        rpm = k.number("requests_per_minute", 0, minimum=0, integer=True) or None
        tpd = k.number("tokens_per_day", 0, minimum=0, integer=True) or None
        k.done()
        keys.append(ApiKeyConfig(name, secret, tuple(dict.fromkeys(allowed)), rpm, tpd))
    return tuple(keys)


def _parse_openai_api(section: _Section) -> OpenAIApiSettings:
    settings = OpenAIApiSettings(
        timeout=section.number("timeout", 300.0, minimum=1),
        max_body_bytes=section.number("max_body_bytes", 4 * 1024 * 1024, minimum=1024, integer=True),
        max_upload_bytes=section.number("max_upload_bytes", 25 * 1024 * 1024, minimum=1024, integer=True),
        max_messages=section.number("max_messages", 256, minimum=1, integer=True),
        max_message_chars=section.number("max_message_chars", 262144, minimum=1, integer=True),
    )
    section.done()
    return settings
