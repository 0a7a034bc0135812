"""Audio and call engines end to end through ``plugins/openai`` and the OpenAI-compatible test
server: the portal serves a recording, the gateway downloads it once, uploads it, and the
transcript comes back in the category's shape. Bad recordings end in error callbacks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.testing import free_port, make_config, silence

pytestmark = pytest.mark.e2e
AUDIO_TOKEN = "audio-token-0123456789abcdef"
CALL_TOKEN = "call-token-0123456789abcdef"


def audio_config(upstream_url: str, route=None, **overrides) -> dict:
    config = make_config(upstream_url, **overrides)
    route = route or [{"provider": "up", "model": "whisper-1"}]
    config["engines"] = [
        {"code": "acme_audio", "name": "ACME audio", "category": "audio", "token": AUDIO_TOKEN, "route": route},
        {"code": "acme_call", "name": "ACME calls", "category": "call", "token": CALL_TOKEN, "route": route},
    ]
    return config


def audio_request(portal, url: str, category: str = "audio", mime: str | None = "audio/wav", hint: str | None = None, language: str = "English"):
    fields = {"type": mime} if mime else {}
    if hint:
        fields["prompt"] = hint
    return portal.new_request(
        category=category,
        prompt={"file": url, "fields": fields, "fileExtension": ""},
        payload_markers={"language": language},
        qualityParam="transcribe_chat_voice_messages",
    )


def recordings_left(gw) -> list[str]:
    root = Path(gw.config["data_dir"]) / "recordings"
    return [str(p) for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_audio_transcript_and_the_upload(gateway, portal, upstream):
    gw = gateway(audio_config(upstream.url))
    recording = silence(0.5)
    url = portal.add_file(recording, "application/octet-stream")
    job_hash, body = audio_request(portal, url, hint="Bitrix24, CRM", language="Русский")
    assert portal.send(gw.completions_url("acme_audio"), body).status_code == 202
    [callback] = portal.wait(job_hash, 20).delivered
    assert callback.kind == "success"
    assert callback.body == {"result": f"transcript of audio.wav ({len(recording)} bytes)"}
    [upload] = upstream.uploads
    assert upload["content"] == recording and upload["filename"] == "audio.wav" and upload["content_type"] == "audio/wav"
    assert upload["fields"] == {"model": "whisper-1", "response_format": "verbose_json", "language": "ru", "prompt": "Bitrix24, CRM"}
    assert portal.file(url).downloads == 1 and recordings_left(gw) == []
    gw.wait_final(1)  # the callback's attempt is stored once the portal's answer is in
    [job] = gw.cli_json("jobs", "list")
    kinds = [a["kind"] for a in gw.cli_json("jobs", "show", job["id"])["attempts"]]
    assert kinds == ["download", "provider", "callback"]


def test_call_result_is_timed_transcriptions(gateway, portal, upstream):
    gw = gateway(audio_config(upstream.url))
    url = portal.add_file(silence(0.5))
    job_hash, body = audio_request(portal, url, category="call")
    assert portal.send(gw.completions_url("acme_call"), body).status_code == 202
    [callback] = portal.wait(job_hash, 20).delivered
    [call] = callback.body["result"]
    assert call["language"] == "en"
    assert call["transcriptions"] == [
        {"user_id": 0, "start_time_formatted": "00:00", "end_time_formatted": "01:01", "text": "transcript of audio.wav"},
        {"user_id": 0, "start_time_formatted": "01:01", "end_time_formatted": "01:15", "text": f"({len(silence(0.5))} bytes)"},
    ]
    assert upstream.uploads[0]["fields"]["timestamp_granularities[]"] == "segment"


def test_server_without_verbose_json_gets_plain_json(gateway, portal, upstream):
    upstream.transcription_mode = "json-only"
    gw = gateway(audio_config(upstream.url))
    hashes = []
    for _ in range(2):
        job_hash, body = audio_request(portal, portal.add_file(silence(0.2)), category="call")
        assert portal.send(gw.completions_url("acme_call"), body).status_code == 202
        hashes.append(job_hash)
        [callback] = portal.wait(job_hash, 20).delivered
        [call] = callback.body["result"]
        [phrase] = call["transcriptions"]  # no segments: one phrase for the whole recording
        assert phrase["text"].startswith("transcript of audio.wav") and call["language"] == ""
    formats = [u["fields"]["response_format"] for u in upstream.uploads]
    assert formats == ["verbose_json", "json", "json"]  # asked once, then remembered


def test_failing_transcription_server_falls_back_to_the_next_target(gateway, portal, upstream, tmp_path):
    from gateway.loopback import LoopbackServer
    from gateway.testing import FakeOpenAI

    second = FakeOpenAI()
    with LoopbackServer(second.app) as server:
        second.url = server.url
        config = audio_config(upstream.url, route=[{"provider": "up", "model": "whisper-1"}, {"provider": "backup", "model": "whisper-large"}])
        config["providers"]["backup"] = {"type": "openai", "base_url": server.url + "/v1"}
        upstream.script("500", "500", "500")
        gw = gateway(config)
        url = portal.add_file(silence(0.3))
        job_hash, body = audio_request(portal, url)
        assert portal.send(gw.completions_url("acme_audio"), body).status_code == 202
        [callback] = portal.wait(job_hash, 20).delivered
        assert callback.kind == "success" and len(upstream.uploads) == 3 and len(second.uploads) == 1
        assert second.uploads[0]["fields"]["model"] == "whisper-large"
        assert portal.file(url).downloads == 1  # one download serves every attempt


@pytest.mark.parametrize(
    "case, code",
    [
        ("redirect_elsewhere", 403),
        ("too_large", 413),
        ("not_audio", 415),
        ("unreachable", 502),
        ("missing", 404),
    ],
)
def test_bad_recordings_end_in_error_callbacks(gateway, portal, upstream, case, code):
    gw = gateway(audio_config(upstream.url, audio={"max_bytes": 64 * 1024, "connect_timeout": 1}))
    url = {
        "redirect_elsewhere": lambda: portal.add_file(redirect=portal.add_file(silence(0.2)).replace("127.0.0.1", "localhost")),
        "too_large": lambda: portal.add_file(stream_bytes=20 * 1024 * 1024, content_type="audio/mpeg"),
        "not_audio": lambda: portal.add_file(b"<html><body>Please log in</body></html>", "text/html"),
        "unreachable": lambda: f"http://127.0.0.1:{free_port()}/disk/file/gone",
        "missing": lambda: f"{portal.url}/disk/file/deleted",
    }[case]()
    job_hash, body = audio_request(portal, url, mime=None if case == "not_audio" else "audio/mpeg")
    assert portal.send(gw.completions_url("acme_audio"), body).status_code == 202
    [callback] = portal.wait(job_hash, 30).delivered
    assert callback.kind == "error" and callback.body["code"] == code and callback.body["api_request_completed"] is False
    assert "recording" in callback.body["message"]
    assert upstream.uploads == [] and recordings_left(gw) == []
    if case == "too_large":
        assert portal.file(url).bytes_sent < 5 * 1024 * 1024


@pytest.mark.parametrize(
    "prompt, problem",
    [
        ({"fields": {"type": "audio/mpeg"}}, "prompt.file"),
        ({"file": "ftp://portal/rec.mp3"}, "prompt.file"),
        ({"file": "/upload/rec.mp3"}, "prompt.file"),
        ({"file": "https://portal/rec", "fields": "audio/mpeg"}, "prompt.fields"),
        ("https://portal/rec.mp3", "prompt"),
        # A host the recording may not be fetched from is refused at accept, before anything is stored.
        ({"file": "http://localhost:8/rec"}, "prompt.file: host localhost is not in security.allowed_portals"),
        ({"file": "http://127.0.0.1:70000/rec"}, "prompt.file: port 70000 is out of range"),
    ],
)
def test_bad_audio_prompts_get_422_and_no_job(gateway, portal, upstream, prompt, problem):
    gw = gateway(audio_config(upstream.url))
    _, body = portal.new_request(category="audio", prompt=prompt)
    response = portal.send(gw.completions_url("acme_audio"), body)
    assert response.status_code == 422 and problem in response.json()["error"]["message"]
    assert gw.cli_json("jobs", "list") == []


def test_temp_files_of_a_killed_worker_are_swept_at_restart(gateway, portal, upstream, tmp_path):
    config = audio_config(upstream.url)
    gw = gateway(config)
    stale = Path(gw.config["data_dir"]) / "recordings" / "999999999"
    stale.mkdir(parents=True)
    (stale / "job-crashed.part").write_bytes(b"partial")
    gw.stop()
    gw.start()
    assert not stale.exists()
    assert os.path.isdir(Path(gw.config["data_dir"]) / "recordings")


def test_simulate_sends_a_recording(gateway, upstream, tmp_path):
    gw = gateway(audio_config(upstream.url))
    wav = tmp_path / "hello.wav"
    wav.write_bytes(silence(0.3))
    result = gw.cli("simulate", "--engine", "acme_call", "--audio", str(wav), "--gateway", gw.url)
    assert "success callback" in result.stdout and '"start_time_formatted": "01:01"' in result.stdout
    assert upstream.uploads[0]["content"] == wav.read_bytes()
    missing = gw.cli("simulate", "--engine", "acme_audio", "--gateway", gw.url, check=False)
    assert missing.returncode == 2 and "--audio FILE" in missing.stderr
