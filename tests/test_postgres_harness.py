"""The throw-away PostgreSQL of the tests (gateway/testing/postgres.py): a real cluster, loopback only, never root."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from gateway.testing.postgres import PostgresNotInstalled, PostgresServer, PostgresServerError, find_bin_dir


def proc_uid(pid: int) -> int:
    """The real uid of a running process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


def test_the_session_server_serves_fresh_databases(postgres_server: PostgresServer, postgres_dsn: str) -> None:
    name = postgres_dsn.rsplit("/", 1)[1]
    assert postgres_dsn == f"postgresql://gateway@127.0.0.1:{postgres_server.port}/{name}"
    assert postgres_server.psql(name, "SELECT current_database(), current_user").strip() == f"{name}|gateway"
    assert postgres_server.psql(name, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").strip() == "0"  # empty
    other = postgres_server.create_database()
    assert other != postgres_dsn
    postgres_server.drop_database(other.rsplit("/", 1)[1])
    assert postgres_server.psql("gateway", "SELECT 1").strip() == "1"  # the default database exists


def test_a_restart_keeps_the_data_and_the_port(postgres_server: PostgresServer, postgres_dsn: str) -> None:
    name = postgres_dsn.rsplit("/", 1)[1]
    postgres_server.psql(name, "CREATE TABLE kept (n int); INSERT INTO kept VALUES (1), (2)")
    port, pid = postgres_server.port, postgres_server.process.pid if postgres_server.process else None
    postgres_server.restart()
    assert postgres_server.port == port and postgres_server.process is not None and postgres_server.process.pid != pid
    assert postgres_server.psql(name, "SELECT sum(n) FROM kept").strip() == "3"
    postgres_server.kill()  # a crash: committed rows come back from the WAL
    assert not postgres_server.running()
    with pytest.raises(PostgresServerError, match="not running"):
        postgres_server.psql(name, "SELECT 1")
    postgres_server.start()
    assert postgres_server.psql(name, "SELECT sum(n) FROM kept").strip() == "3"


def test_the_server_is_not_root_and_listens_on_127_0_0_1_only(postgres_server: PostgresServer, postgres_dsn: str) -> None:
    name = postgres_dsn.rsplit("/", 1)[1]
    assert postgres_server.process is not None
    data_dir = postgres_server.psql(name, "SELECT current_setting('data_directory')").strip()
    assert Path(data_dir) == postgres_server.data_dir
    assert os.stat(data_dir).st_uid != 0 and proc_uid(postgres_server.process.pid) != 0
    if os.geteuid() == 0:
        assert proc_uid(postgres_server.process.pid) == os.stat(data_dir).st_uid  # nobody, not root
    settings = postgres_server.psql(name, "SELECT current_setting('listen_addresses') || ',' || current_setting('unix_socket_directories')").strip()
    assert settings == "127.0.0.1,"  # no socket file anywhere
    with pytest.raises(ConnectionRefusedError):  # another loopback address: not listened on
        socket.create_connection(("127.0.0.2", postgres_server.port or 0), timeout=2).close()
    socket.create_connection(("127.0.0.1", postgres_server.port or 0), timeout=2).close()


def test_a_server_of_its_own_is_removed_by_cleanup() -> None:
    with PostgresServer() as server:
        base = server.data_dir.parent
        assert server.running() and (server.data_dir / "PG_VERSION").is_file()
        dsn = server.create_database("my_db")
        assert dsn.endswith(f"127.0.0.1:{server.port}/my_db")
        with pytest.raises(ValueError, match="letters, digits"):
            server.create_database("x; DROP")
    assert not server.running() and not base.exists()


def test_no_postgresql_is_an_error_naming_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(PostgresNotInstalled, match=r"make system-packages"):
        find_bin_dir(tmp_path / "postgresql")
    (tmp_path / "postgresql" / "9.6" / "bin").mkdir(parents=True)
    for version in ("9.6", "15", "16"):
        folder = tmp_path / "postgresql" / version / "bin"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "initdb").touch()
        (folder / "postgres").touch()
    assert find_bin_dir(tmp_path / "postgresql") == tmp_path / "postgresql" / "16" / "bin"  # the newest, by number
