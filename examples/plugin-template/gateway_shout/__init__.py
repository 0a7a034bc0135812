"""An example plugin: copy this package to start your own.

It shows the two things most plugins do:

- ``register_adapters``: adds adapter type ``shout``, which answers every text task with
  the prompt in capitals. Use it in a config as ``providers: {loud: {type: shout}}``.
- ``prepare_task``: a guardrail that refuses prompts containing a configured word.

Install it beside the gateway (``pip install -e examples/plugin-template``), then
``gateway plugins`` lists it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from gateway.spi import Task, TaskRefused, TextPrompt, TextRequest, TextResult, check_known_options, hookimpl


class ShoutAdapter:
    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        check_known_options(options, {"suffix"})  # a misspelt option is a config error naming it, with a "did you mean"
        self.suffix = str(options.get("suffix", "!"))

    async def complete(self, request: TextRequest) -> TextResult:
        return TextResult(text=request.messages[-1].content.upper() + self.suffix)


@hookimpl
def register_adapters(register: Any) -> None:
    register("shout", ShoutAdapter, categories=["text"])


@hookimpl
def prepare_task(task: Task) -> None:
    banned = os.environ.get("SHOUT_BANNED_WORD")
    if banned and isinstance(task.prompt, TextPrompt) and banned.lower() in task.prompt.text.lower():
        raise TaskRefused(f"the prompt contains {banned!r}", code=400)
