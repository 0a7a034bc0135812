"""Everything a plugin may import from the gateway, in one place: the plugin's contract.

A plugin (``[project.entry-points.gateway]``) imports from here and from nowhere else in
``gateway``: the modules these names live in are the core's own and may be reorganised;
this list is kept stable. Its tests import :mod:`gateway.testing` as well (fixtures,
the upstream stub, the portal emulator and the gateway runner).

What is here:

- ``hookimpl``: marks a plugin's hook implementations (the hooks are in ``gateway.hookspecs``);
- the task a plugin's hooks receive and its typed prompt (``TextPrompt``, ``ImagePrompt``,
  ``AudioPrompt``, ``CallPrompt``);
- adapter protocols (``TextAdapter``, ``ImageAdapter``, ``AudioAdapter``, and the optional
  ``StreamingTextAdapter`` whose ``stream`` yields ``TextChunk``), and the typed requests and
  results they exchange;
- the errors a plugin raises: ``AdapterError`` (a call failed; ``retryable`` says whether
  trying again may help), ``AdapterConfigError`` (a provider option is wrong), ``TaskRefused``
  (a guardrail in ``prepare_task`` turns a task down);
- option readers that give config errors naming the key, and parsers of the OpenAI answer
  shapes that compatible servers and litellm share;
- ``http_transport``: the httpx transport the core uses (outbound policy; aiohttp underneath);
- helpers for in-process models on the CPU (``InProcessModel``: load once, share, run off the
  event loop; ``SharedModels``; background thread and process pools);
- what the outcome hooks receive: ``HostedImages`` (an image task's result), ``JobError``
  with its ``ErrorReason``, and the final ``JobState``;
- ``Backoff``: the gateway's retry schedule (exponential, equal jitter), for a plugin's own retries.
"""

from gateway.adapter_options import check_known_options, flag_option, number_option, whole_option
from gateway.adapters import (
    AdapterConfigError,
    AdapterError,
    AudioAdapter,
    AudioRequest,
    GeneratedImage,
    HostedImages,
    ImageAdapter,
    ImageRequest,
    ImageResult,
    Segment,
    StreamingTextAdapter,
    TextAdapter,
    TextChunk,
    TextRequest,
    TextResult,
    Transcript,
    Usage,
)
from gateway.backoff import Backoff
from gateway.cpu import InProcessModel, SharedModels, background_processes, background_threads, stop_processes
from gateway.hookspecs import hookimpl
from gateway.http import transport as http_transport
from gateway.openai_shapes import images_from_openai, transcript_from_openai
from gateway.outcomes import ErrorReason, JobError, JobState
from gateway.tasks import AudioPrompt, CallPrompt, Category, ImagePrompt, Message, Prompt, Task, TaskRefused, TextPrompt

__all__ = [
    "AdapterConfigError",
    "AdapterError",
    "AudioAdapter",
    "AudioPrompt",
    "AudioRequest",
    "Backoff",
    "CallPrompt",
    "Category",
    "ErrorReason",
    "GeneratedImage",
    "HostedImages",
    "ImageAdapter",
    "ImagePrompt",
    "ImageRequest",
    "ImageResult",
    "InProcessModel",
    "JobError",
    "JobState",
    "Message",
    "Prompt",
    "Segment",
    "SharedModels",
    "StreamingTextAdapter",
    "Task",
    "TaskRefused",
    "TextAdapter",
    "TextChunk",
    "TextPrompt",
    "TextRequest",
    "TextResult",
    "Transcript",
    "Usage",
    "background_processes",
    "background_threads",
    "check_known_options",
    "flag_option",
    "hookimpl",
    "http_transport",
    "images_from_openai",
    "number_option",
    "stop_processes",
    "transcript_from_openai",
    "whole_option",
]
