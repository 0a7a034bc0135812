"""Secrets belong to a runtime's redactor, and building a runtime has no side effects until it is prepared."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from gateway import hookimpl
from gateway.config import ConfigError, load_config
from gateway.plugins import default_plugins
from gateway.redaction import MASK, RedactingFormatter, Redactor
from gateway.runtime import Runtime, RuntimeNotPrepared
from gateway.spi import AdapterConfigError
from gateway.testing.runner import make_config

PROVIDER_KEY = "plain-provider-key"


def test_two_redactors_do_not_share_secrets():
    first, second = Redactor(), Redactor()
    first.add("first-runtime-secret")
    second.add("second-runtime-secret")
    text = "first-runtime-secret and second-runtime-secret"
    assert first.redact(text) == f"{MASK} and second-runtime-secret"
    assert second.redact(text) == f"first-runtime-secret and {MASK}"


def test_short_values_are_not_secrets_and_patterns_apply_without_any():
    redactor = Redactor()
    redactor.add("abc")
    redactor.add(None)
    assert redactor.redact("abc callback?hash=0123456789abcdef") == f"abc callback?hash={MASK}"


def test_the_logging_formatter_masks_its_redactors_secrets_tracebacks_included():
    redactor, other = Redactor(), Redactor()
    redactor.add("runtime-secret-value")
    other.add("unrelated-secret-value")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(RedactingFormatter(redactor))
    logger = logging.getLogger("tests.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise RuntimeError("upstream refused runtime-secret-value")
        except RuntimeError:
            logger.exception("calling with runtime-secret-value and unrelated-secret-value")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    output = stream.getvalue()
    assert "runtime-secret-value" not in output
    assert f"calling with {MASK}" in output and f"RuntimeError: upstream refused {MASK}" in output  # the message and the traceback
    assert "unrelated-secret-value" in output  # another runtime's secret is not this formatter's to know


class FakeAdapter:
    loads: ClassVar[list[str]] = []

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        self.name, self.broken = name, options.get("broken", False)

    def load(self) -> None:
        FakeAdapter.loads.append(self.name)
        if self.broken == "bug":
            raise OSError("mmap failed")
        if self.broken:
            raise AdapterConfigError("model_path", "the model file is corrupt")


class FakeAdapters:
    @hookimpl
    def register_adapters(self, register):
        register("fake", FakeAdapter, categories=["text"])


@pytest.fixture
def fake_adapter_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A config on the fake adapter, with an engine whose token is generated (written to data_dir)."""
    monkeypatch.setattr("gateway.runtime.default_plugins", lambda metrics: [*default_plugins(metrics), (FakeAdapters(), "fake-adapters")])
    monkeypatch.setattr(FakeAdapter, "loads", [])

    def write(name: str, **options: Any):
        config = make_config("http://127.0.0.1:9")
        config["providers"] = {"up": {"type": "fake", "api_key": f"{PROVIDER_KEY}-{name}", **options}}
        del config["engines"][0]["token"]
        config["data_dir"] = str(tmp_path / name / "var")
        path = tmp_path / name / "gateway.yaml"
        path.parent.mkdir()
        path.write_text(yaml.safe_dump(config))
        return load_config(path)

    return write


def test_a_runtime_is_built_without_writing_files_or_loading_models(fake_adapter_config):
    config = fake_adapter_config("one")
    data_dir = Path(config.data_dir)
    data_dir.mkdir(parents=True)
    runtime = Runtime(config)
    assert list(data_dir.iterdir()) == [] and FakeAdapter.loads == []
    with pytest.raises(RuntimeNotPrepared):
        runtime.engines  # noqa: B018 - the property is the behaviour under test
    runtime.prepare()
    runtime.prepare()  # once only
    assert FakeAdapter.loads == ["up"]
    assert [p.name for p in data_dir.iterdir()] == ["engine-tokens.json"]
    token = runtime.engines.get("acme_text").token
    assert runtime.redactor.redact(f"token {token}") == f"token {MASK}"


def test_a_broken_model_is_a_config_error_when_prepared(fake_adapter_config):
    runtime = Runtime(fake_adapter_config("broken", broken=True))
    with pytest.raises(ConfigError) as err:
        runtime.prepare()
    assert err.value.key == "providers.up.model_path"


def test_any_other_load_failure_is_a_config_error_naming_the_provider(fake_adapter_config):
    """Not a traceback at start-up: one line naming the provider and what failed."""
    runtime = Runtime(fake_adapter_config("bug", broken="bug"))
    with pytest.raises(ConfigError) as err:
        runtime.prepare()
    assert err.value.key == "providers.up" and err.value.problem == "the adapter failed to load: OSError: mmap failed"


def test_two_runtimes_keep_their_secrets_apart(fake_adapter_config):
    one, two = Runtime(fake_adapter_config("one"), with_worker=False), Runtime(fake_adapter_config("two"), with_worker=False)
    one.prepare()
    two.prepare()
    one_token, two_token = one.engines.get("acme_text").token, two.engines.get("acme_text").token
    text = f"{PROVIDER_KEY}-one {PROVIDER_KEY}-two"
    assert f"{PROVIDER_KEY}-one" not in one.redactor.redact(text) and f"{PROVIDER_KEY}-two" in one.redactor.redact(text)
    assert f"{PROVIDER_KEY}-two" not in two.redactor.redact(text) and f"{PROVIDER_KEY}-one" in two.redactor.redact(text)
    assert one_token in one.redactor and one_token not in two.redactor and two_token not in one.redactor
    assert one.deliverer.redactor is one.redactor and one.loops.redactor is one.redactor
