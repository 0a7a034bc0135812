from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config
from gateway.tasks import Category

MINIMAL = """
providers:
  up: {type: openai, base_url: "${UP_URL:-http://127.0.0.1:1/v1}", api_key: "${KEY}"}
engines:
  - code: acme_text
    category: text
    route: [{provider: up, model: m}]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


def test_interpolation_and_defaults(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), environ={"KEY": "secret-value"})
    assert config.providers["up"].options == {"base_url": "http://127.0.0.1:1/v1", "api_key": "secret-value"}
    engine = config.engine("acme_text")
    assert engine is not None and engine.category is Category.TEXT and engine.name == "acme_text"
    assert engine.token is None
    assert config.max_body_bytes == 1024 * 1024 and config.queue.backend == "sqlite"


def test_missing_variable_names_file_key_and_fix(tmp_path):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert err.value.file == str(path)
    assert err.value.key == "providers.up.api_key"
    assert "KEY" in err.value.problem and "export KEY=" in err.value.fix
    assert str(path) in str(err.value) and "Fix:" in str(err.value)


def test_misspelled_key_suggests_the_right_one(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, MINIMAL + "securty: {}\n"), environ={"KEY": "k"})
    assert err.value.key == "securty" and "security" in err.value.fix


@pytest.mark.parametrize(
    "snippet, key",
    [
        ("engines:\n  - {code: 'bad code', category: text, route: [{provider: up, model: m}]}", "engines[0].code"),
        ("engines:\n  - {code: a, category: video, route: [{provider: up, model: m}]}", "engines[0].category"),
        ("engines:\n  - {code: a, category: text, route: [{provider: nope, model: m}]}", "engines[0].route[0].provider"),
        ("engines:\n  - {code: a, category: text, route: []}", "engines[0].route"),
        ("engines:\n  - {code: a, category: text, token: short, route: [{provider: up, model: m}]}", "engines[0].token"),
        (
            "engines:\n  - {code: a, category: text, route: [{provider: up, model: m}]}\n  - {code: A, category: text, route: [{provider: up, model: m}]}",
            "engines[1].code",
        ),
        ("limits: {max_body_bytes: lots}", "limits.max_body_bytes"),
        ("security: {allow_private_networks: maybe}", "security.allow_private_networks"),
        ("queue: {backend: redis}", "queue.backend"),
        ("queue: {backend: postgres}", "queue.dsn"),
        ("queue: {backend: postgres, dsn: 'mysql://db/gateway'}", "queue.dsn"),
        ("queue: {backend: postgres, dsn: 'postgresql://db:99999/gateway'}", "queue.dsn"),
        ("queue: {backend: postgres, dsn: 'postgresql:///gateway'}", "queue.dsn"),
        ("queue: {backend: postgres, dsn: 'postgresql://db/gateway', path: q.sqlite3}", "queue.path"),
        ("queue: {backend: postgres, dsn: 'postgresql://db/gateway', pool_size: 1}", "queue.pool_size"),
        ("public_url: gw.example.com", "public_url"),
    ],
)
def test_invalid_values_are_reported_with_their_key(tmp_path, snippet, key):
    text = "providers:\n  up: {type: openai}\n" + snippet + "\n"
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), environ={})
    assert err.value.key == key
    assert err.value.fix


def test_a_postgres_queue_takes_its_dsn_from_the_environment_and_never_prints_the_password(tmp_path):
    text = "queue: {backend: postgres, dsn: '${GATEWAY_QUEUE_DSN}'}\n"
    dsn = "postgresql://gateway:Pa55-SECRET-word@db1:5432,db2:5433/gateway?target_session_attrs=read-write"
    config = load_config(write(tmp_path, text), environ={"GATEWAY_QUEUE_DSN": dsn})
    assert config.queue.backend == "postgres" and config.queue.dsn == dsn
    assert config.queue.poll_interval == 5.0  # LISTEN/NOTIFY wakes workers; the poll is a safety net
    assert "SECRET" not in config.queue.location and "db1:5432,db2:5433/gateway" in config.queue.location
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "queue: {backend: postgres, dsn: 'postgresql://u:Pa55-SECRET-word@db:0/x'}\n"), environ={})
    assert err.value.key == "queue.dsn" and "SECRET" not in str(err.value)


def test_interpolated_booleans_and_numbers(tmp_path):
    text = "security: {allow_private_networks: '${PRIV}'}\nlimits: {max_body_bytes: '${MAX}'}\n"
    config = load_config(write(tmp_path, text), environ={"PRIV": "true", "MAX": "4096"})
    assert config.security.allow_private_networks is True and config.max_body_bytes == 4096


def test_missing_file_and_broken_yaml(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is not valid YAML at line 2"):
        load_config(write(tmp_path, "a: 1\n  b: 2\n"))


def test_relative_paths_are_taken_from_the_config_files_folder(tmp_path, monkeypatch):
    folder = tmp_path / "deploy"
    folder.mkdir()
    write(folder, MINIMAL + "data_dir: ./data\nqueue: {path: jobs/queue.sqlite3}\n")
    monkeypatch.chdir(tmp_path)  # the CLI is run from another folder, the config named relatively
    config = load_config(Path("deploy/gateway.yaml"), environ={"KEY": "k"})
    assert config.data_dir == folder / "data"
    assert config.queue.path == folder / "jobs" / "queue.sqlite3"
    assert config.path == Path("deploy/gateway.yaml")  # errors still name the file as the user gave it


def test_default_paths_and_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "conf").mkdir()
    config = load_config(write(tmp_path / "conf", MINIMAL), environ={"KEY": "k"})
    assert config.data_dir == tmp_path / "conf" / "var" and config.queue.path == tmp_path / "conf" / "var" / "queue.sqlite3"
    config = load_config(write(tmp_path / "conf", MINIMAL + f"data_dir: {tmp_path}/state\n"), environ={"KEY": "k"})
    assert config.data_dir == tmp_path / "state" and config.queue.path == tmp_path / "state" / "queue.sqlite3"


def test_the_embedded_default_keeps_its_data_beside_it(monkeypatch, tmp_path):
    """`make run` serves examples/gateway.yaml: its ./var is examples/var, whichever folder the CLI runs in."""
    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(tmp_path)
    config = load_config(root / "examples" / "gateway.yaml", environ={})
    assert config.data_dir == root / "examples" / "var"
    assert config.portal_webhook_variable == "BITRIX24_WEBHOOK"  # unset: only the portal commands need it


def test_the_cluster_example_needs_its_database_url_and_names_the_variable(monkeypatch, tmp_path):
    root = Path(__file__).resolve().parent.parent
    with pytest.raises(ConfigError) as err:
        load_config(root / "examples" / "cluster.yaml", environ={"OPENAI_API_KEY": "k"})
    assert err.value.key == "queue.dsn" and "GATEWAY_QUEUE_DSN" in str(err.value)
    config = load_config(root / "examples" / "cluster.yaml", environ={"OPENAI_API_KEY": "k", "GATEWAY_QUEUE_DSN": "postgresql://gw:pw@db:5432/gateway"})
    assert config.queue.backend == "postgres" and config.queue.location == "PostgreSQL db:5432/gateway"


def test_unset_webhook_variable_leaves_the_portal_unset(tmp_path):
    text = MINIMAL + 'portal: {webhook: "${BITRIX24_WEBHOOK}", retries: 2}\n'
    config = load_config(write(tmp_path, text), environ={"KEY": "k"})
    assert config.portal_webhook is None and config.portal_webhook_variable == "BITRIX24_WEBHOOK" and config.portal_retries == 2
    webhook = "https://acme.bitrix24.com/rest/1/secret/"
    config = load_config(write(tmp_path, text), environ={"KEY": "k", "BITRIX24_WEBHOOK": webhook})
    assert config.portal_webhook == webhook and config.portal_webhook_variable is None
    with pytest.raises(ConfigError) as err:  # only portal.webhook is optional: other keys still need their variable
        load_config(write(tmp_path, text), environ={})
    assert err.value.key == "providers.up.api_key"


@pytest.mark.parametrize("snippet, expected", [("", "when_requested"), ("context: always", "always"), ("context: when_requested", "when_requested")])
def test_engine_context_setting(tmp_path, snippet, expected):
    text = f"providers:\n  up: {{type: openai}}\nengines:\n  - code: a\n    category: text\n    route: [{{provider: up, model: m}}]\n    {snippet}\n"
    engine = load_config(write(tmp_path, text), environ={}).engine("a")
    assert engine is not None and engine.context == expected


def test_engine_context_refuses_other_values(tmp_path):
    text = "providers:\n  up: {type: openai}\nengines:\n  - {code: a, category: text, context: sometimes, route: [{provider: up, model: m}]}\n"
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), environ={})
    assert err.value.key == "engines[0].context" and err.value.problem == "unknown value 'sometimes'"
    assert "when_requested" in err.value.fix and "always" in err.value.fix and "collect_context" in err.value.fix
