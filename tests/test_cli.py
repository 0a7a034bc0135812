from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.harness import ENGINE_TOKEN, make_config


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def write_config(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({**config, "data_dir": str(tmp_path / "var")}))
    return path


def test_config_error_exit_code_and_message(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text("engines:\n  - {code: a, category: text, route: [{provider: missing, model: m}]}\n")
    result = run("serve", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert str(path) in result.stderr and "engines[0].route[0].provider" in result.stderr and "Fix:" in result.stderr


def test_missing_config_file_says_how_to_fix(tmp_path):
    result = run("engines", "list", cwd=tmp_path)
    assert result.returncode == 2 and "gateway.yaml: file not found" in result.stderr and "--config" in result.stderr


def test_engines_list_json_has_full_urls(tmp_path):
    config = make_config("http://127.0.0.1:1")
    config["engines"].append({"code": "auto_tok", "category": "text", "route": [{"provider": "up", "model": "m"}]})
    path = write_config(tmp_path, config)
    first = json.loads(run("engines", "list", "--json", "--config", str(path), cwd=tmp_path).stdout)
    assert [(e["code"], e["name"], e["category"]) for e in first] == [("acme_text", "ACME text", "text"), ("auto_tok", "auto_tok", "text")]
    assert first[0]["completions_url"] == f"http://127.0.0.1:0/engines/acme_text/{ENGINE_TOKEN}/completions"
    generated = first[1]["completions_url"].split("/")[-2]
    assert len(generated) >= 24
    tokens_file = tmp_path / "var" / "engine-tokens.json"
    assert tokens_file.stat().st_mode & 0o077 == 0  # readable by the owner only
    again = json.loads(run("engines", "list", "--json", "--config", str(path), cwd=tmp_path).stdout)
    assert again[1]["completions_url"] == first[1]["completions_url"]  # stable across runs


def test_jobs_show_unknown_id(tmp_path):
    path = write_config(tmp_path, make_config("http://127.0.0.1:1"))
    assert run("jobs", "list", "--config", str(path), cwd=tmp_path).stdout.strip() == "no jobs"
    result = run("jobs", "show", "nope", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 1 and "no job 'nope'" in result.stderr


@pytest.mark.e2e
def test_simulate_against_a_running_gateway(gateway):
    gw = gateway()
    result = gw.cli("simulate", "--engine", "acme_text", "--prompt", "from the simulator", "--gateway", gw.url)
    assert "registration check (GET completions_url): HTTP 200 ok" in result.stdout
    assert "completions POST: HTTP 202" in result.stdout
    assert '"result": "echo: from the simulator"' in result.stdout


@pytest.mark.e2e
def test_simulate_reports_a_gateway_that_is_down(tmp_path):
    path = write_config(tmp_path, make_config("http://127.0.0.1:1"))
    result = run("simulate", "--engine", "acme_text", "--gateway", "http://127.0.0.1:9", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 1 and "Is `gateway serve` running?" in result.stderr
