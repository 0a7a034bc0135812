from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.testing import ENGINE_TOKEN, make_config


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GATEWAY_CONFIG", "GATEWAY_LOAD_PLUGINS", "BITRIX24_WEBHOOK")}
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=60)


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


def test_engines_list_from_another_folder_uses_the_same_data(tmp_path):
    folder, elsewhere = tmp_path / "deploy", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    config = make_config("http://127.0.0.1:1", data_dir="./var")
    del config["engines"][0]["token"]  # generated and kept in data_dir
    (folder / "gateway.yaml").write_text(yaml.safe_dump(config))
    here = run("engines", "list", "--json", "--config", "gateway.yaml", cwd=folder)
    there = run("engines", "list", "--json", "--config", str(folder / "gateway.yaml"), cwd=elsewhere)
    assert here.returncode == 0 and there.returncode == 0, here.stderr + there.stderr
    assert json.loads(there.stdout) == json.loads(here.stdout)  # the same generated token, so the same URL
    assert (folder / "var" / "engine-tokens.json").exists() and not (elsewhere / "var").exists()
    text = run("engines", "list", "--config", str(folder / "gateway.yaml"), cwd=elsewhere).stdout
    data = folder / "var"
    assert text.splitlines()[0] == f"data: {data} (tokens in {data / 'engine-tokens.json'}, queue {data / 'queue.sqlite3'})"
    assert json.loads(here.stdout)[0]["completions_url"] in text


@pytest.mark.e2e
def test_portal_flag_stands_in_for_an_unset_webhook_variable(tmp_path, portal):
    config = make_config("http://127.0.0.1:1", portal={"webhook": "${BITRIX24_WEBHOOK}", "retries": 0})
    path = write_config(tmp_path, config)
    listed = run("engines", "list", "--json", "--config", str(path), cwd=tmp_path)  # needs no portal
    assert listed.returncode == 0 and [e["code"] for e in json.loads(listed.stdout)] == ["acme_text"], listed.stderr
    missing = run("engines", "remote", "--config", str(path), cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.strip() == (
        f"configuration error: {path}: portal.webhook: environment variable BITRIX24_WEBHOOK is not set. "
        "Fix: export BITRIX24_WEBHOOK=https://<portal>/rest/<user>/<secret>/ or pass --portal https://<portal>/rest/<user>/<secret>/"
    )
    remote = run("engines", "remote", "--json", "--portal", portal.webhook, "--config", str(path), cwd=tmp_path)
    assert remote.returncode == 0, remote.stderr
    assert [(s["code"], s["status"]) for s in json.loads(remote.stdout)] == [("acme_text", "missing")]
    assert [m for m, _ in portal.rest_calls] == ["ai.engine.list"]


def test_simulate_with_a_recording_that_is_not_there(tmp_path):
    config = make_config("http://127.0.0.1:1")
    config["engines"].append(
        {"code": "acme_audio", "category": "audio", "token": ENGINE_TOKEN.replace("0", "7"), "route": [{"provider": "up", "model": "whisper-1"}]}
    )
    path = write_config(tmp_path, config)
    missing = run("simulate", "--engine", "acme_audio", "--audio", "missing.wav", "--gateway", "http://127.0.0.1:9", "--config", str(path), cwd=tmp_path)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip() == "--audio missing.wav: cannot read the recording (No such file or directory); pass the path of an audio file"
    none = run("simulate", "--engine", "acme_audio", "--gateway", "http://127.0.0.1:9", "--config", str(path), cwd=tmp_path)
    assert none.returncode == 2 and none.stderr.strip() == (
        "engine acme_audio is an audio engine: pass --audio FILE (a recording the emulator serves to the gateway)"
    )


@pytest.mark.e2e
def test_jobs_show_prints_readable_text(gateway, portal, upstream):
    upstream.script("500", "500", "500")  # the first job fails after its retries, the second succeeds
    gw = gateway()
    for number, prompt in enumerate(("doomed", "fine"), start=1):
        job_hash, body = portal.new_request(prompt=prompt)
        assert portal.send(gw.completions_url(), body).status_code == 202
        portal.wait(job_hash, timeout=20)
        gw.wait_final(number)
    delivered, failed = gw.cli_json("jobs", "list")  # newest first
    assert (delivered["state"], failed["state"]) == ("delivered", "failed")

    shown = gw.cli_json("jobs", "show", delivered["id"])  # --json keeps the structure
    usage = shown["result"]["usage"]
    lines = gw.cli("jobs", "show", delivered["id"]).stdout.splitlines()
    assert (
        f"{'result':>18}: text, 10 characters; {usage['prompt_tokens']} prompt tokens, {usage['completion_tokens']} completion tokens, {usage['total_tokens']} total tokens"
        in lines
    )

    error = gw.cli_json("jobs", "show", failed["id"])["error"]
    lines = gw.cli("jobs", "show", failed["id"]).stdout.splitlines()
    assert f"{'error':>18}: {error['message']} (code {error['code']}, provider_error)" in lines
    header = lines[: lines.index(f"{'attempts':>18}:")]
    assert not [line for line in header if "{" in line or "None" in line]  # no Python dicts or None


@pytest.mark.parametrize(
    "result, line",
    [
        ({"kind": "images", "urls": ["http://gw/files/a.png", "http://gw/files/b.png"], "usage": None}, "images, 2 image(s)"),
        (
            {"kind": "transcript", "text": "Hello there", "language": "en", "duration": 6.04, "segments": [], "usage": {"cost_usd": 0.0012}},
            "transcript, 11 characters, language en, 6.0 s of audio; $0.001200",
        ),
        ({"kind": "text", "text": "hi", "usage": {"total_tokens": 5}}, "text, 2 characters; 5 total tokens"),
    ],
)
def test_jobs_show_describes_each_kind_of_result(result, line):
    from gateway.jobs.reports import describe_result

    assert describe_result(result) == line


def store_jobs(path: Path) -> dict[str, str]:
    """Jobs written straight into the config's SQLite queue (no gateway running): a queued text job
    from acme, a queued image job from beta accepted 2 h ago, a text job that ended dead with a result."""
    import asyncio
    import time

    from gateway.jobs.model import Job, JobState, Outcome, new_job_id
    from gateway.jobs.sqlite import SQLiteJobQueue
    from gateway.tasks import Category, ImagePrompt, Task, TextPrompt

    def job(engine: str, category: Category, portal: str, age: float) -> Job:
        time.sleep(0.002)  # ids order by their millisecond first: two made in the same one order at random
        accepted = time.time() - age
        prompt = ImagePrompt("a cat") if category is Category.IMAGE else TextPrompt("hi")
        task = Task(job_id=new_job_id(), engine=engine, category=category, prompt=prompt, accepted_at=accepted, deadline=accepted + 14400, portal=portal)
        return Job(task, f"http://{portal}/cb?hash=x", f"http://{portal}/err?hash=x")

    async def fill() -> dict[str, str]:
        queue = SQLiteJobQueue(path)
        await queue.open()
        try:
            queued, _ = await queue.enqueue(job("acme_text", Category.TEXT, "acme.bitrix24.com", 60), "a", lease_owner=None, lease_seconds=5)
            image, _ = await queue.enqueue(job("acme_image", Category.IMAGE, "beta.bitrix24.de", 7200), "b", lease_owner=None, lease_seconds=5)
            dead, _ = await queue.enqueue(job("acme_text", Category.TEXT, "acme.bitrix24.com", 30), "c", lease_owner="w", lease_seconds=30)
            await queue.store_outcome(dead.id, "w", Outcome(result={"kind": "text", "text": "hello"}), [])
            await queue.finish(dead.id, "w", JobState.DEAD, "portal refused the callback with HTTP 400", [])
            return {"queued": queued.id, "image": image.id, "dead": dead.id}
        finally:
            await queue.close()

    return asyncio.run(fill())


def test_jobs_list_filters_cancel_redeliver_and_stats(tmp_path):
    path = write_config(tmp_path, make_config("http://127.0.0.1:1"))
    ids = store_jobs(tmp_path / "var" / "queue.sqlite3")

    def listed(*args: str) -> list[str]:
        result = run("jobs", "list", "--json", *args, "--config", str(path), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        return [job["id"] for job in json.loads(result.stdout)]

    assert listed() == [ids["dead"], ids["image"], ids["queued"]]
    assert listed("--engine", "acme_text", "--since", "15m") == [ids["dead"], ids["queued"]]
    assert listed("--portal", "Beta.Bitrix24.de", "--category", "image", "--since", "1d") == [ids["image"]]
    assert listed("--state", "queued", "--before", ids["image"]) == [ids["queued"]]
    junk = run("jobs", "list", "--since", "yesterday", "--config", str(path), cwd=tmp_path)
    assert junk.returncode == 2
    assert junk.stderr.strip() == "--since: 'yesterday' is not a time span: use a number of minutes, hours or days (15m, 2h, 1d), or 'all'"

    cancelled = run("jobs", "cancel", ids["queued"], "--config", str(path), cwd=tmp_path)
    assert (
        cancelled.returncode == 0 and cancelled.stdout.strip() == f"job {ids['queued']}: cancelled: a worker delivers the error (code cancelled) to the portal"
    )
    refused = run("jobs", "redeliver", ids["image"], "--config", str(path), cwd=tmp_path)
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.strip() == (
        f"cannot redeliver job {ids['image']}: it is still queued: the gateway delivers it by itself; re-delivery is for jobs that ended dead"
    )
    unknown = run("jobs", "cancel", "nope", "--config", str(path), cwd=tmp_path)
    assert unknown.returncode == 1 and unknown.stderr.strip().startswith("cannot cancel job nope: no such job")
    again = run("jobs", "redeliver", ids["dead"], "--config", str(path), cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.strip() == f"job {ids['dead']}: delivering: a worker delivers its outcome again"

    stats = run("jobs", "stats", "--json", "--config", str(path), cwd=tmp_path)
    assert stats.returncode == 0, stats.stderr
    shown = json.loads(stats.stdout)
    assert shown["minutes"] == 60 and shown["pending"] == {"queued": 1, "running": 0, "delivering": 2}
    assert [(row["engine"], row["accepted"], row["failed"], row["p50"]) for row in shown["engines"]] == [("acme_text", 2, 0, None)]
    text = run("jobs", "stats", "--config", str(path), cwd=tmp_path).stdout.splitlines()
    assert text[0] == "last 60 minute(s); pending now: queued 1, running 0, delivering 2"
    assert text[2].split() == ["acme_text", "text", "2", "0", "0", "0", "-", "-"]


def test_jobs_list_and_show_survive_a_job_whose_stored_task_cannot_be_read(tmp_path):
    import sqlite3

    path = write_config(tmp_path, make_config("http://127.0.0.1:1"))
    ids = store_jobs(tmp_path / "var" / "queue.sqlite3")
    with sqlite3.connect(tmp_path / "var" / "queue.sqlite3") as conn:
        conn.execute("UPDATE jobs SET task = '{\"job_id\": 1' WHERE id = ?", (ids["image"],))
    conn.close()

    listed = run("jobs", "list", "--json", "--config", str(path), cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert [(job["id"], job["engine"]) for job in json.loads(listed.stdout)] == [
        (ids["dead"], "acme_text"),
        (ids["image"], "acme_image"),
        (ids["queued"], "acme_text"),
    ]
    shown = run("jobs", "show", ids["image"], "--config", str(path), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "the stored job cannot be read: JSONDecodeError" in shown.stdout and "acme_image" in shown.stdout
