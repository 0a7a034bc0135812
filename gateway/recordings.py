"""Downloading the recordings of ``audio`` and ``call`` tasks from the portal.

The portal sends only a URL (``prompt.file``) and no credentials; the URL comes from an
untrusted body, so the download goes through the outbound URL policy: portal hosts
only, private addresses only if allowed, redirects only to allowed hosts, a size cap
enforced while streaming, and connect/read timeouts. Each job downloads its recording
once, to a temporary file under ``data_dir/recordings/<pid>`` that is removed when the
job's attempt ends; folders of processes that no longer run are swept at start-up.

Whether the bytes are audio is decided by their signature, which also names the file's
extension (servers that pick a decoder by file name need it when the URL has none).
Only for formats without a known signature does the declared type count: the URL's
extension, ``fileExtension``, ``fields.type``, then the answer's ``Content-Type``.
"""

from __future__ import annotations

import contextlib
import logging
import mimetypes
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from gateway import http
from gateway.config import RecordingSettings
from gateway.netguard import OutboundPolicy, URLRefused

log = logging.getLogger("gateway.recordings")
REDIRECTS = (301, 302, 303, 307, 308)
SNIFF_BYTES = 64

# (signature test, extension, MIME type); the first match wins.
_SIGNATURES: tuple[tuple[Any, str, str], ...] = (
    (lambda h: h[:4] == b"RIFF" and h[8:12] == b"WAVE", "wav", "audio/wav"),
    (lambda h: h[:3] == b"ID3", "mp3", "audio/mpeg"),
    (lambda h: h[:4] == b"OggS", "ogg", "audio/ogg"),
    (lambda h: h[:4] == b"fLaC", "flac", "audio/flac"),
    (lambda h: h[4:8] == b"ftyp", "m4a", "audio/mp4"),
    (lambda h: h[:4] == b"\x1a\x45\xdf\xa3", "webm", "audio/webm"),
    (lambda h: h[:5] == b"#!AMR", "amr", "audio/amr"),
    (lambda h: h[:4] == b"FORM" and h[8:12] in (b"AIFF", b"AIFC"), "aiff", "audio/aiff"),
    (lambda h: h[:4] == b"\x30\x26\xb2\x75", "wma", "audio/x-ms-wma"),
    (lambda h: len(h) > 1 and h[0] == 0xFF and h[1] & 0xF6 == 0xF0, "aac", "audio/aac"),
    (lambda h: len(h) > 1 and h[0] == 0xFF and h[1] & 0xE0 == 0xE0, "mp3", "audio/mpeg"),
)
_EXTRA_TYPES = {"audio/mp3": "mp3", "audio/x-wav": "wav", "audio/wave": "wav", "audio/x-m4a": "m4a", "audio/webm": "webm", "audio/opus": "ogg"}


@dataclass(frozen=True)
class Recording:
    """The downloaded audio of an ``audio`` or ``call`` task, in a temporary file."""

    path: Path
    filename: str
    content_type: str
    size: int


class DownloadError(Exception):
    """The recording could not be fetched; ``code`` goes to the portal's error callback."""

    def __init__(self, message: str, *, code: int, retryable: bool) -> None:
        super().__init__(message)
        self.message, self.code, self.retryable = message, code, retryable


def sniff_audio(head: bytes) -> tuple[str, str] | None:
    """``(extension, MIME type)`` for the audio formats recognised by their first bytes."""
    for test, extension, mime in _SIGNATURES:
        if test(head):
            return extension, mime
    return None


def _declared_audio(*, url: str, extension: str | None, mime: str | None, content_type: str | None) -> tuple[str, str] | None:
    """What the portal and the server say the file is, when that is audio (or video, which carries audio)."""
    suffix = PurePosixPath(urlsplit(url).path).suffix.lstrip(".").lower() or (extension or "").lstrip(".").lower()
    if suffix:
        guessed = mimetypes.types_map.get(f".{suffix}")
        if guessed and guessed.startswith(("audio/", "video/")):
            return suffix, guessed
    for declared in (mime, content_type):
        kind = (declared or "").split(";", 1)[0].strip().lower()
        if kind.startswith(("audio/", "video/")):
            ext = _EXTRA_TYPES.get(kind) or (mimetypes.guess_extension(kind) or ".bin").lstrip(".")
            return ext, kind
    return None


class RecordingFetcher:
    def __init__(self, policy: OutboundPolicy, settings: RecordingSettings, directory: str | os.PathLike[str]) -> None:
        self.policy, self.settings = policy, settings
        self.directory = Path(directory) / str(os.getpid())
        self._client = httpx.AsyncClient(
            transport=http.transport(policy),
            follow_redirects=False,  # followed by hand, each hop checked against the policy
            timeout=httpx.Timeout(settings.read_timeout, connect=settings.connect_timeout),
            headers={"User-Agent": "bitrix24-ai-gateway"},
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    def sweep(self) -> int:
        """Delete recordings left behind by processes that did not end cleanly.

        Each process downloads into a folder named after its pid, so that several worker
        processes can share ``data_dir`` without sweeping each other's files."""
        root = self.directory.parent
        if not root.is_dir():
            return 0
        removed = 0
        for folder in root.iterdir():
            if folder.is_dir() and folder.name.isdigit() and (folder == self.directory or not _process_alive(int(folder.name))):
                for entry in folder.iterdir():
                    entry.unlink(missing_ok=True)
                    removed += 1
                if folder != self.directory:
                    folder.rmdir()
        return removed

    @contextlib.asynccontextmanager
    async def fetch(self, url: str, *, mime: str | None, extension: str | None, timeout: float, job_id: str) -> AsyncIterator[Recording]:
        """Download to a temporary file that exists exactly as long as the ``async with`` block."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{job_id}-{secrets.token_hex(4)}.part"
        try:
            recording = await self._download(url, path, mime=mime, extension=extension, deadline=time.monotonic() + timeout)
            yield recording
        finally:
            path.unlink(missing_ok=True)

    async def _download(self, url: str, path: Path, *, mime: str | None, extension: str | None, deadline: float) -> Recording:
        cap = self.settings.max_bytes
        try:
            for _ in range(self.settings.max_redirects + 1):
                self.policy.check_url(url)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DownloadError("the recording could not be downloaded in the time left", code=504, retryable=False)
                timeout = httpx.Timeout(min(self.settings.read_timeout, remaining), connect=min(self.settings.connect_timeout, remaining))
                async with self._client.stream("GET", url, timeout=timeout) as response:
                    if response.status_code in REDIRECTS and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        continue
                    _check_status(response.status_code)
                    length = response.headers.get("content-length", "")
                    if length.isdigit() and int(length) > cap:
                        raise DownloadError(f"the recording is {int(length)} bytes, more than audio.max_bytes ({cap})", code=413, retryable=False)
                    size, head = 0, b""
                    with path.open("wb") as file:
                        async for chunk in response.aiter_bytes():
                            size += len(chunk)
                            if size > cap:
                                raise DownloadError(f"the recording is larger than audio.max_bytes ({cap} bytes); download aborted", code=413, retryable=False)
                            if len(head) < SNIFF_BYTES:
                                head += chunk[:SNIFF_BYTES]
                            file.write(chunk)
                            if time.monotonic() > deadline:
                                raise DownloadError("the recording could not be downloaded in the time left", code=504, retryable=False)
                    kind = sniff_audio(head) or _declared_audio(url=url, extension=extension, mime=mime, content_type=response.headers.get("content-type"))
                    if size == 0:
                        raise DownloadError("the recording is empty", code=415, retryable=False)
                    if kind is None:
                        raise DownloadError("the file is not audio in a known format (checked its first bytes and declared type)", code=415, retryable=False)
                    return Recording(path, f"audio.{kind[0]}", kind[1], size)
            raise DownloadError(f"more than {self.settings.max_redirects} redirects", code=502, retryable=False)
        except URLRefused as exc:
            raise DownloadError(f"the recording's URL was refused: {exc}", code=403, retryable=False) from None
        except httpx.TimeoutException as exc:
            raise DownloadError(f"downloading the recording timed out ({type(exc).__name__})", code=504, retryable=True) from None
        except httpx.HTTPError as exc:
            raise DownloadError(f"downloading the recording failed: {type(exc).__name__}: {exc}", code=502, retryable=True) from None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_status(status: int) -> None:
    if status == 200:
        return
    if status in (404, 410):
        raise DownloadError(f"the portal has no such recording (HTTP {status})", code=404, retryable=False)
    if status in (401, 403):
        raise DownloadError(f"the portal refused the download (HTTP {status})", code=403, retryable=False)
    if status in REDIRECTS:
        raise DownloadError(f"the portal redirected without a Location (HTTP {status})", code=502, retryable=False)
    retryable = status >= 500 or status in (408, 425, 429)
    raise DownloadError(f"downloading the recording failed: HTTP {status}", code=502 if retryable else 400, retryable=retryable)
