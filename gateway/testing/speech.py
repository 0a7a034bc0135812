"""Real speech for transcription tests: espeak-ng (a Debian package that ``.ci/run`` installs)."""

from __future__ import annotations

import io
import shutil
import subprocess
import wave


def speak(text: str, *, padding: float = 0.5) -> bytes:
    """A WAV of ``text`` spoken by espeak-ng (en-us, 140 wpm), with ``padding`` s of silence each side."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise RuntimeError("espeak-ng is not installed: run `apt-get install espeak-ng` (.ci/run does)")
    spoken = subprocess.run([espeak, "-v", "en-us", "-s", "140", "--stdout", text], capture_output=True, check=True).stdout
    with wave.open(io.BytesIO(spoken)) as source:
        params, frames = source.getparams(), source.readframes(source.getnframes())
    silence = b"\0" * int(params.framerate * padding) * params.sampwidth * params.nchannels
    out = io.BytesIO()
    with wave.open(out, "wb") as target:
        target.setparams(params)
        target.writeframes(silence + frames + silence)
    return out.getvalue()


def silence(seconds: float = 2.0, rate: int = 16000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as target:
        target.setnchannels(1)
        target.setsampwidth(2)
        target.setframerate(rate)
        target.writeframes(b"\0\0" * int(rate * seconds))
    return out.getvalue()
