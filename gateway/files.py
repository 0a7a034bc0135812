"""Hosting generated images at public, unguessable URLs.

The portal shows the first image URL it receives and does not copy it; users may save
it hours later, while providers' own URLs often expire within the hour. So the gateway
keeps the bytes itself and serves them at ``{public_url}/files/<id>.<ext>``: ids carry
192 random bits, files are checked to be real PNG, JPEG or WebP images before they are
stored, and they are deleted after ``files.retention_days``.

Storage sits behind :class:`FileStore`: a folder of ``data_dir`` on the embedded default, the
shared database with PostgreSQL (:mod:`gateway.postgres.files`: any node serves any file); an
S3-compatible store could replace either without touching the rest.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import httpx

from gateway import http
from gateway.adapters import AdapterError, HostedImages, ImageResult
from gateway.netguard import OutboundPolicy, URLRefused

CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{32}\.(png|jpg|webp)$")


def image_extension(data: bytes) -> str | None:
    """The file extension for PNG, JPEG or WebP bytes (by their signature), else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


@dataclass(frozen=True)
class StoredFile:
    """A hosted file to serve: on local disk (``path``, sent without reading it into memory) or
    its bytes (``data``, from the shared database)."""

    content_type: str
    path: Path | None = None
    data: bytes | None = None


def file_id(name: str) -> str | None:
    """The extension of a well-formed stored name (``<32 characters>.<ext>``), else None: no
    separators, no dots but the extension's, so no traversal and no lookup of junk."""
    match = NAME_RE.match(name)
    return match.group(1) if match else None


def new_file_name(extension: str) -> str:
    return f"{secrets.token_urlsafe(24)}.{extension}"  # 24 bytes: 192 bits, 32 characters


class FileStore(Protocol):
    async def put(self, data: bytes, extension: str) -> str:
        """Store the bytes; returns the public file name ``<id>.<ext>``."""
        ...

    async def read(self, name: str) -> StoredFile | None:
        """The stored file of that name, or None for a name that is not a stored file."""
        ...

    async def delete_older_than(self, cutoff: float) -> int: ...

    async def delete(self, names: list[str]) -> int:
        """Delete these stored files (an uninstalled portal's, with ``CLEAN``); names that are not stored are skipped."""
        ...


class LocalFileStore:
    """Files in a folder of ``data_dir``: the embedded default (one machine)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    async def put(self, data: bytes, extension: str) -> str:
        name = new_file_name(extension)

        def write() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / f".{name}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, self.root / name)

        await asyncio.to_thread(write)
        return name

    async def read(self, name: str) -> StoredFile | None:
        extension = file_id(name)
        if extension is None:
            return None
        path = self.root / name
        return StoredFile(CONTENT_TYPES[extension], path=path) if path.is_file() else None

    async def delete(self, names: list[str]) -> int:
        def remove() -> int:
            deleted = 0
            for name in names:
                if file_id(name) is None:
                    continue
                try:
                    os.unlink(self.root / name)
                    deleted += 1
                except FileNotFoundError:
                    pass
            return deleted

        return await asyncio.to_thread(remove)

    async def delete_older_than(self, cutoff: float) -> int:
        def sweep() -> int:
            if not self.root.is_dir():
                return 0
            deleted = 0
            for entry in os.scandir(self.root):
                if entry.is_file() and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    deleted += 1
            return deleted

        return await asyncio.to_thread(sweep)


class ImageHost:
    """Turns an adapter's images (bytes or provider URLs) into URLs the gateway serves."""

    def __init__(self, store: FileStore, public_url: str, *, allow_private_networks: bool, max_bytes: int, retention_days: float) -> None:
        self.store, self.public_url, self.max_bytes = store, public_url.rstrip("/"), max_bytes
        self.retention_seconds = retention_days * 86400
        # Provider URLs may point anywhere public (a CDN, a bucket); never inside the network.
        self._policy = OutboundPolicy(["*"], allow_private_networks)
        self._client = httpx.AsyncClient(
            transport=http.transport(self._policy),
            follow_redirects=True,
            timeout=httpx.Timeout(60.0, connect=10.0),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def host(self, result: ImageResult) -> HostedImages:
        if not result.images:
            raise AdapterError("the provider returned no image", retryable=True)
        urls = []
        for image in result.images:
            data = image.data if image.data is not None else await self._download(image.url or "")
            extension = image_extension(data)
            if extension is None:
                raise AdapterError("the provider returned bytes that are not a PNG, JPEG or WebP image", retryable=False)
            urls.append(f"{self.public_url}/files/{await self.store.put(data, extension)}")
        return HostedImages(urls, usage=result.usage)

    async def _download(self, url: str) -> bytes:
        try:
            self._policy.check_url(url)  # scheme, credentials, literal addresses; names are checked on connect
            async with self._client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise AdapterError(f"downloading the provider's image failed: HTTP {response.status_code}", retryable=response.status_code >= 500)
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > self.max_bytes:
                        raise AdapterError(f"the provider's image is larger than files.max_bytes ({self.max_bytes} bytes)", retryable=False)
                return bytes(data)
        except URLRefused as exc:
            raise AdapterError(f"the provider's image URL was refused: {exc}", retryable=False) from None
        except httpx.HTTPError as exc:
            raise AdapterError(f"downloading the provider's image failed: {type(exc).__name__}", retryable=True) from None

    async def delete_expired(self) -> int:
        return await self.store.delete_older_than(time.time() - self.retention_seconds)
