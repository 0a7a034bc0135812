"""The answer shapes of OpenAI's image and transcription endpoints, read into typed results.

OpenAI-compatible servers and litellm answer in these shapes too, so the ``openai`` and
``litellm`` plugins share one reading of them (no SDK is imported: these are plain JSON
shapes, or the objects litellm builds from them).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

from gateway.adapters import AdapterError, GeneratedImage, Segment, Transcript, Usage
from gateway.languages import language_code


def images_from_openai(items: Any, provider: str) -> list[GeneratedImage]:
    """The pictures in the ``data`` list of OpenAI's ``/images/generations`` answer, which
    compatible servers and litellm share: each ``b64_json`` or ``url``."""
    if not isinstance(items, (list, tuple)) or not items:
        raise AdapterError(f"{provider}: the answer has no data[] of images", retryable=True)
    images = []
    for item in items:
        fields = item if isinstance(item, Mapping) else vars(item)  # litellm hands over objects
        if isinstance(fields.get("b64_json"), str):
            try:
                images.append(GeneratedImage(data=base64.b64decode(fields["b64_json"], validate=True)))
            except binascii.Error:
                raise AdapterError(f"{provider}: b64_json is not valid base64", retryable=False) from None
        elif isinstance(fields.get("url"), str):
            images.append(GeneratedImage(url=fields["url"]))
        else:
            raise AdapterError(f"{provider}: an image has neither b64_json nor url", retryable=False)
    return images


def transcript_from_openai(data: Mapping[str, Any], provider: str, usage: Usage | None = None) -> Transcript:
    """A :class:`Transcript` from the answer shape of OpenAI's ``/audio/transcriptions`` (``json``
    or ``verbose_json``), which compatible servers and litellm answer in too.

    No text at all is a retryable failure; text with no words is final (422: there is no
    speech in the recording), and so is a segment without start, end or text."""
    text = data.get("text")
    if not isinstance(text, str):
        raise AdapterError(f"{provider}: the answer has no text", retryable=True)
    if not text.strip():
        raise AdapterError(f"{provider}: no speech was recognised in the recording", retryable=False, status=422)
    segments = []
    for item in data.get("segments") or ():
        fields = item if isinstance(item, Mapping) else vars(item)  # litellm hands over objects
        try:
            segments.append(Segment(float(fields["start"]), float(fields["end"]), str(fields["text"]).strip()))
        except (KeyError, TypeError, ValueError):
            raise AdapterError(f"{provider}: a segment lacks start, end or text", retryable=False) from None
    language, duration = data.get("language"), data.get("duration")
    return Transcript(
        text=text.strip(),
        segments=tuple(segments),
        language=(language_code(language) or language) if isinstance(language, str) else None,  # verbose_json says "english"
        duration=float(duration) if isinstance(duration, (int, float)) else None,
        usage=usage,
    )
