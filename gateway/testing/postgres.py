"""A throw-away PostgreSQL cluster for tests and benchmarks: ``initdb`` into a temp dir, ``postgres`` as a child.

No system service, no socket file, nothing outside its temp dir: the cluster listens on
127.0.0.1 only, on a free port, trusts its one superuser (``gateway``), and is removed by
:meth:`PostgresServer.cleanup`. PostgreSQL refuses to run as root, so under root (CI, containers)
``initdb`` and ``postgres`` run as ``nobody``. A missing PostgreSQL is an error that says how to
install it (``make system-packages``): a test that needs the database must fail, not skip.

    with PostgresServer() as server:
        dsn = server.create_database()  # postgresql://gateway@127.0.0.1:<port>/test_1_...
        server.restart()  # same data dir and port: the data stays

This module does not import pytest or a database driver: it runs the server's own binaries.
"""

from __future__ import annotations

import contextlib
import grp
import itertools
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from gateway.testing.runner import free_port

SUPERUSER = "gateway"
DEFAULT_DATABASE = "gateway"
UNPRIVILEGED_USER, UNPRIVILEGED_GROUP = "nobody", "nogroup"
INSTALL_HINT = "install it with `make system-packages` (Debian/Ubuntu: apt-get install postgresql)"
# Suited to tests: many pools at once, loopback only, no socket file. Durable commits (fsync on):
# the end-to-end tests kill PostgreSQL and count on what it acknowledged.
DEFAULT_SETTINGS: Mapping[str, str] = {
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",
    "max_connections": "200",
    "fsync": "on",
    "log_min_messages": "warning",
    "log_connections": "off",
}
_names = itertools.count(1)


class PostgresNotInstalled(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


class PostgresServerError(RuntimeError):
    """The throw-away cluster could not be created, started or used; the message carries the server's log tail."""


def find_bin_dir(versions_root: Path = Path("/usr/lib/postgresql")) -> Path:
    """The folder of ``initdb``/``postgres``: from PATH (symlinks resolved, so ``psql`` beside them is the
    server's own, not Debian's wrapper), else the newest ``/usr/lib/postgresql/<version>/bin``."""
    initdb = shutil.which("initdb")
    if initdb:
        folder = Path(initdb).resolve().parent
        if (folder / "postgres").is_file():
            return folder
    versions = [path for path in versions_root.glob("*/bin") if (path / "initdb").is_file() and (path / "postgres").is_file()]
    if versions:
        return max(versions, key=lambda path: [int(part) for part in re.findall(r"\d+", path.parent.name)] or [0])
    raise PostgresNotInstalled(f"PostgreSQL is not installed (no initdb on PATH nor in {versions_root}/*/bin): {INSTALL_HINT}")


def _child_env() -> dict[str, str]:
    """The environment without ``PG*`` variables (a developer's PGHOST/PGDATA must not redirect the cluster)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no server log)"
    return "\n".join(text.splitlines()[-lines:]) or "(the server log is empty)"


class PostgresServer:
    """One PostgreSQL cluster in a temp dir, started as a child process in its own session.

    ``settings`` override :data:`DEFAULT_SETTINGS` (``postgres -c key=value``). The port is chosen
    at the first :meth:`start` and kept by :meth:`restart`, so DSNs handed out stay valid."""

    def __init__(self, *, bin_dir: Path | None = None, settings: Mapping[str, str] | None = None, start_timeout: float = 60.0) -> None:
        self.bin_dir = bin_dir or find_bin_dir()
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self.start_timeout = start_timeout
        self.port: int | None = None
        self.base_dir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._run_as: dict[str, Any] = {}
        if os.geteuid() == 0:  # initdb and postgres refuse root
            try:
                user = pwd.getpwnam(UNPRIVILEGED_USER)
            except KeyError:
                raise PostgresServerError(
                    f"running as root, and PostgreSQL refuses root: there is no user {UNPRIVILEGED_USER!r} to run it as (create it, or run the tests as another user)"
                ) from None
            try:
                gid = grp.getgrnam(UNPRIVILEGED_GROUP).gr_gid
            except KeyError:
                gid = user.pw_gid
            self._run_as = {"user": user.pw_uid, "group": gid, "extra_groups": []}

    @property
    def data_dir(self) -> Path:
        if self.base_dir is None:
            raise PostgresServerError("the cluster has not been created yet: call start()")
        return self.base_dir / "data"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / "postgres.log"

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> PostgresServer:
        """Create the cluster (first call) and start the server; returns once it accepts connections."""
        if self.running():
            return self
        first = self.base_dir is None
        if first:
            self._init()
        for attempt in range(3 if first else 1):
            if first:
                self.port = free_port()
            try:
                self._spawn()
                break
            except PostgresServerError as error:
                # Another process took the free port between the check and the bind: try another one.
                if "could not bind" not in str(error) or attempt == 2:
                    raise
        if first:
            self._psql("postgres", f'CREATE DATABASE "{DEFAULT_DATABASE}"')
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT: open transactions are rolled back, then a checkpoint); SIGKILL if it hangs."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends (a crash: the next start recovers from the WAL)."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        # The backends die with the group; wait (bounded) so the next start finds no one attached to the old shared memory.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _group_alive(self.process.pid):
            time.sleep(0.02)

    def restart(self) -> PostgresServer:
        """Stop and start again on the same data dir and port."""
        self.stop()
        return self.start()

    def dsn(self, database: str = DEFAULT_DATABASE) -> str:
        if self.port is None:
            raise PostgresServerError("the server has not been started: call start()")
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A fresh, empty database; returns its DSN."""
        name = name or f"test_{next(_names)}_{secrets.token_hex(3)}"
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", name):
            raise ValueError(f"database name {name!r}: use letters, digits and _ (at most 63)")
        self._psql("postgres", f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting whoever is still connected to it."""
        self._psql("postgres", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def psql(self, database: str, sql: str) -> str:
        """Run SQL with the server's own ``psql`` (unaligned, tuples only); returns its output."""
        return self._psql(database, sql)

    def cleanup(self) -> None:
        """Stop the server and remove its temp dir."""
        self.stop()
        if self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = None

    def __enter__(self) -> PostgresServer:
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.cleanup()

    def _init(self) -> None:
        self.base_dir = Path(tempfile.mkdtemp(prefix="gateway-postgres-"))
        if self._run_as:
            os.chown(self.base_dir, self._run_as["user"], self._run_as["group"])
        command = [str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER, "--auth=trust", "--no-sync", "--encoding=UTF8", "--locale=C"]
        try:
            done = subprocess.run(command, cwd=self.base_dir, env=_child_env(), capture_output=True, timeout=120, check=False, **self._run_as)
        except (OSError, subprocess.SubprocessError) as error:
            raise PostgresServerError(f"initdb could not run ({self.bin_dir / 'initdb'}): {type(error).__name__}: {error}") from error
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace").strip()
            raise PostgresServerError(f"initdb failed (exit {done.returncode}) in {self.data_dir}:\n{output[-3000:]}")

    def _spawn(self) -> None:
        assert self.port is not None
        command = [str(self.bin_dir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)]
        for key, value in self.settings.items():
            command += ["-c", f"{key}={value}"]
        try:
            with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
                log_start = log.tell()
                self.process = subprocess.Popen(
                    command,
                    cwd=self.data_dir.parent,
                    env=_child_env(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    **self._run_as,
                )
        except OSError as error:
            raise PostgresServerError(f"postgres could not be started ({command[0]}): {type(error).__name__}: {error}") from error
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.process.poll() is not None:
                code = self.process.returncode
                raise PostgresServerError(
                    f"postgres exited at start (exit {code}) on 127.0.0.1:{self.port}; server log:\n{_tail_from(self.log_path, log_start)}"
                )
            if self._ready():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise PostgresServerError(
                    f"postgres did not accept connections on 127.0.0.1:{self.port} within {self.start_timeout:g} s; server log:\n{_tail_from(self.log_path, log_start)}"
                )
            time.sleep(0.05)

    def _ready(self) -> bool:
        """``postmaster.pid`` is this process's (not one left by a killed server) and says ``ready``
        (PostgreSQL 10+), and the port answers."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        if len(lines) < 8 or self.process is None or lines[0].strip() != str(self.process.pid) or lines[7].strip() != "ready":
            return False
        try:
            with socket.create_connection(("127.0.0.1", self.port or 0), timeout=1):
                return True
        except OSError:
            return False

    def _psql(self, database: str, sql: str) -> str:
        if not self.running():
            raise PostgresServerError("the server is not running: call start()")
        command = [str(self.bin_dir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", self.dsn(database), "-c", sql]
        try:
            done = subprocess.run(command, env=_child_env(), capture_output=True, timeout=60, check=False)
        except (OSError, subprocess.SubprocessError) as error:
            raise PostgresServerError(f"psql could not run ({command[0]}): {type(error).__name__}: {error}") from error
        if done.returncode != 0:
            raise PostgresServerError(f"psql failed (exit {done.returncode}) on database {database!r}: {done.stderr.decode(errors='replace').strip()}")
        return done.stdout.decode()


def _tail_from(path: Path, offset: int) -> str:
    """The log written since ``offset`` (this start's lines), or the whole tail if it was shorter."""
    try:
        with open(path, "rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
    except OSError:
        return _tail(path)
    return "\n".join(text.splitlines()[-30:]) or _tail(path)


def _group_alive(pgid: int) -> bool:
    """A live (not zombie) process is left in the group: read from /proc where there is one,
    since a container's init may never reap the orphaned backends."""
    proc = Path("/proc")
    if proc.is_dir():
        for stat in proc.glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] != "Z":
                    return True
        return False
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True
