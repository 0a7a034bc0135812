"""Downloading recordings: the URL policy, redirects, the size cap, format checks, cleanup.

The fetcher talks HTTP to the portal emulator on a real socket."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from gateway.config import RecordingSettings
from gateway.netguard import OutboundPolicy
from gateway.recordings import DownloadError, RecordingFetcher, sniff_audio
from gateway.testing import free_port

pytestmark = pytest.mark.anyio


def wav_bytes(seconds: float = 0.1, rate: int = 8000) -> bytes:
    frames = b"\0\0" * int(seconds * rate)
    header = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + len(frames), b"WAVE", b"fmt ", 16, 1, 1, rate, rate * 2, 2, 16, b"data", len(frames))
    return header + frames


@pytest.fixture
def fetcher(tmp_path: Path):
    made = []

    def make(*, hosts=("127.0.0.1",), private=True, **settings) -> RecordingFetcher:
        made.append(RecordingFetcher(OutboundPolicy(hosts, private), RecordingSettings(**settings), tmp_path / "recordings"))
        return made[-1]

    yield make
    for f in made:
        f.sweep()


async def fetch(fetcher: RecordingFetcher, url: str, **kw) -> tuple[bytes, str, str]:
    async with fetcher.fetch(url, mime=kw.get("mime"), extension=kw.get("extension"), timeout=10, job_id="job1") as recording:
        assert recording.path.is_file()
        return recording.path.read_bytes(), recording.filename, recording.content_type


def leftovers(fetcher: RecordingFetcher) -> list[str]:
    return sorted(os.listdir(fetcher.directory)) if fetcher.directory.exists() else []


async def test_downloads_once_names_the_format_and_removes_the_file(fetcher, portal):
    f = fetcher()
    url = portal.add_file(wav_bytes(), "application/octet-stream")
    data, filename, content_type = await fetch(f, url)
    assert data == wav_bytes() and filename == "audio.wav" and content_type == "audio/wav"
    assert portal.file(url).downloads == 1 and leftovers(f) == []


async def test_declared_type_counts_only_for_formats_without_a_signature(fetcher, portal):
    f = fetcher()
    unknown = b"\x00\x01\x02 some codec without a known signature" * 10
    data, filename, content_type = await fetch(f, portal.add_file(unknown), mime="audio/x-custom")
    assert data == unknown and content_type == "audio/x-custom"
    _, filename, _ = await fetch(f, portal.add_file(unknown), mime=None, extension="mp3")
    assert filename == "audio.mp3"


@pytest.mark.parametrize(
    "body, content_type",
    [
        (b"<!DOCTYPE html><html><body>Login</body></html>", "text/html"),
        (b'{"error": "ACCESS_DENIED"}', "application/json"),
        (b"", "audio/mpeg"),
    ],
)
async def test_not_audio_is_refused(fetcher, portal, body, content_type):
    f = fetcher()
    with pytest.raises(DownloadError) as err:
        await fetch(f, portal.add_file(body, content_type), mime=None)
    assert err.value.code == 415 and not err.value.retryable and leftovers(f) == []


async def test_host_not_allowed_is_never_contacted(fetcher, portal):
    f = fetcher(hosts=("acme.bitrix24.com",))
    url = portal.add_file(wav_bytes())
    with pytest.raises(DownloadError) as err:
        await fetch(f, url)
    assert err.value.code == 403 and "allowed_portals" in err.value.message
    assert portal.file(url).downloads == 0


async def test_private_address_is_refused_unless_allowed(fetcher, portal):
    f = fetcher(private=False)
    url = portal.add_file(wav_bytes())
    with pytest.raises(DownloadError) as err:
        await fetch(f, url)
    assert err.value.code == 403 and "allow_private_networks" in err.value.message
    assert portal.file(url).downloads == 0


async def test_redirects_stay_within_allowed_hosts(fetcher, portal):
    f = fetcher()
    target = portal.add_file(wav_bytes())
    data, _, _ = await fetch(f, portal.add_file(redirect=target))
    assert data == wav_bytes()
    elsewhere = portal.add_file(wav_bytes())
    hop = portal.add_file(redirect=elsewhere.replace("127.0.0.1", "localhost"))
    with pytest.raises(DownloadError) as err:
        await fetch(f, hop)
    assert err.value.code == 403 and "localhost" in err.value.message
    assert portal.file(elsewhere).downloads == 0


async def test_redirect_loops_end(fetcher, portal):
    f = fetcher(max_redirects=2)
    first = portal.add_file()
    portal.file(first).redirect = first
    with pytest.raises(DownloadError, match="more than 2 redirects"):
        await fetch(f, first)


async def test_size_cap_aborts_a_stream_early(fetcher, portal):
    f = fetcher(max_bytes=256 * 1024)
    url = portal.add_file(stream_bytes=50 * 1024 * 1024, content_type="audio/mpeg")
    with pytest.raises(DownloadError) as err:
        await fetch(f, url)
    assert err.value.code == 413 and "audio.max_bytes" in err.value.message
    assert portal.file(url).bytes_sent < 10 * 1024 * 1024  # stopped long before the end
    assert leftovers(f) == []


async def test_size_cap_refuses_a_declared_length_before_reading(fetcher, portal):
    f = fetcher(max_bytes=1024)
    with pytest.raises(DownloadError) as err:
        await fetch(f, portal.add_file(wav_bytes(1.0)))
    assert err.value.code == 413 and "bytes, more than" in err.value.message and leftovers(f) == []


async def test_missing_file_and_unreachable_portal(fetcher, portal):
    f = fetcher(connect_timeout=1)
    with pytest.raises(DownloadError) as err:
        await fetch(f, f"{portal.url}/disk/file/nope")
    assert err.value.code == 404 and not err.value.retryable
    with pytest.raises(DownloadError) as err:
        await fetch(f, f"http://127.0.0.1:{free_port()}/disk/file/x")
    assert err.value.code == 502 and err.value.retryable and leftovers(f) == []


def test_sweep_removes_folders_of_dead_processes_only(tmp_path):
    root = tmp_path / "recordings"
    dead, alive = root / "999999999", root / str(os.getppid())
    for folder in (dead, alive):
        folder.mkdir(parents=True)
        (folder / "job-x.part").write_bytes(b"x")
    fetcher = RecordingFetcher(OutboundPolicy(["*"]), RecordingSettings(), root)
    assert fetcher.sweep() == 1
    assert not dead.exists() and (alive / "job-x.part").exists()


@pytest.mark.parametrize(
    "head, extension",
    [
        (wav_bytes(), "wav"),
        (b"ID3\x04", "mp3"),
        (b"\xff\xfb\x90\x00", "mp3"),
        (b"OggS\x00\x02", "ogg"),
        (b"fLaC\x00", "flac"),
        (b"\x00\x00\x00\x20ftypM4A ", "m4a"),
        (b"\x1a\x45\xdf\xa3\x01", "webm"),
        (b"#!AMR\n", "amr"),
        (b"\xff\xf1\x50\x80", "aac"),
        (b"<html>", None),
    ],
)
def test_sniffing(head, extension):
    found = sniff_audio(head)
    assert (found[0] if found else None) == extension
