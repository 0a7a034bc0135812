"""The plugin contract: plugins import the gateway only through ``gateway.spi`` (and their tests
through ``gateway.testing``), so the core can be reorganised without breaking them, and an
installed plugin runs its own tests without the core's ``tests`` folder."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import gateway.spi
import gateway.testing

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_FOLDERS = sorted([*ROOT.glob("plugins/*/"), ROOT / "examples" / "plugin-template"])
ALLOWED_IN_CODE = {"gateway.spi"}
ALLOWED_IN_TESTS = {"gateway.spi", "gateway.testing"}


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (imports inside functions count too)."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules.add(node.module)
    return modules


def core_imports(path: Path) -> set[str]:
    return {m for m in imported_modules(path) if m == "gateway" or m.startswith("gateway.")}


@pytest.mark.parametrize("folder", PLUGIN_FOLDERS, ids=lambda folder: str(folder.relative_to(ROOT)))
def test_plugins_import_the_core_only_through_the_spi(folder):
    assert folder.is_dir()
    for path in sorted(folder.rglob("*.py")):
        relative = path.relative_to(folder)
        in_tests = relative.parts[0] == "tests"
        allowed = ALLOWED_IN_TESTS if in_tests else ALLOWED_IN_CODE
        assert core_imports(path) <= allowed, f"{path.relative_to(ROOT)} imports {sorted(core_imports(path) - allowed)}: use {' or '.join(sorted(allowed))}"
        if in_tests:
            assert not {m for m in imported_modules(path) if m == "tests" or m.startswith("tests.")}, (
                f"{path.relative_to(ROOT)} imports the core's tests folder, which an installed plugin does not have: use gateway.testing"
            )


@pytest.mark.parametrize("module", [gateway.spi, gateway.testing], ids=lambda module: module.__name__)
def test_every_exported_name_exists_once(module):
    assert len(module.__all__) == len(set(module.__all__))
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing


def test_the_spi_has_what_an_adapter_needs():
    for name in (
        "hookimpl",
        "TextAdapter",
        "ImageAdapter",
        "AudioAdapter",
        "TextRequest",
        "TextResult",
        "ImageRequest",
        "ImageResult",
        "AudioRequest",
        "Transcript",
        "AdapterError",
        "AdapterConfigError",
        "TaskRefused",
        "check_known_options",
        "http_transport",
    ):
        assert name in gateway.spi.__all__, name


def test_the_testing_package_does_not_need_pytest():
    """Benchmarks import gateway.testing: only its fixtures module is a pytest plugin."""
    imported = set().union(*(imported_modules(path) for path in (ROOT / "gateway" / "testing").glob("*.py") if path.name != "fixtures.py"))
    assert "pytest" not in imported
