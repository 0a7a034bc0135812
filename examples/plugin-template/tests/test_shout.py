import asyncio

import pytest
from gateway_shout import ShoutAdapter, prepare_task

from gateway import TaskRefused
from gateway.adapters import TextRequest
from gateway.tasks import Category, Message, Task


def test_shouts():
    adapter = ShoutAdapter("loud", {"suffix": "!!"})
    result = asyncio.run(adapter.complete(TextRequest(model="any", messages=[Message("user", "hello")])))
    assert result.text == "HELLO!!"


def test_refuses_banned_word(monkeypatch):
    monkeypatch.setenv("SHOUT_BANNED_WORD", "secret")
    with pytest.raises(TaskRefused):
        prepare_task(Task(job_id="j", engine="e", category=Category.TEXT, prompt="tell me the secret"))
