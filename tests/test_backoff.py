"""The one retry schedule (gateway.backoff): exponential growth, a cap, equal jitter, and never past a deadline."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from gateway.backoff import Backoff
from gateway.cpu import InProcessModel, SharedModels
from gateway.spi import AdapterConfigError


def fixed(value: float) -> Backoff:
    return Backoff(0.5, 8.0, rng=lambda: value)


def test_delay_doubles_from_initial_until_the_cap():
    assert [fixed(0.999999).ceiling(n) for n in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert fixed(0.0).delay(0) == 0.25 and fixed(0.0).delay(3) == 2.0  # the lowest draw: half the ceiling
    assert fixed(0.5).delay(2) == 1.5


def test_jitter_stays_between_half_the_ceiling_and_the_ceiling():
    backoff = Backoff(1.0, 30.0)
    for attempt in range(8):
        ceiling = backoff.ceiling(attempt)
        delays = [backoff.delay(attempt) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1  # jittered, not one value


def test_huge_attempt_numbers_stay_at_the_cap():
    assert fixed(0.0).delay(10**6) == 4.0
    assert Backoff(1.0, rng=lambda: 0.0).delay(10**6) == 2.0**59  # no cap: still a float, no OverflowError
    assert fixed(0.0).delay(-1) == 0.25  # a negative attempt counts as the first


def test_next_at_refuses_to_reach_the_deadline():
    backoff = fixed(0.0)  # delay(0) == 0.25
    assert backoff.next_at(0, deadline=100.0, now=99.0) == 99.25
    assert backoff.next_at(0, deadline=99.25, now=99.0) is None


def test_sleep_waits_the_delay_or_gives_up_without_waiting():
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    backoff = fixed(0.0)
    assert asyncio.run(backoff.sleep(1, time.time() + 60, sleep=sleep)) is True
    assert slept == [0.5]
    assert asyncio.run(backoff.sleep(1, time.time() + 0.1, sleep=sleep)) is False
    assert slept == [0.5]


@dataclass
class Toy:
    name: str
    threads: ThreadPoolExecutor


def test_in_process_model_loads_once_per_key_and_runs_in_its_threads():
    shared: SharedModels[Toy] = SharedModels()
    created: list[str] = []

    def create(name: str) -> Toy:
        created.append(name)
        return Toy(name, ThreadPoolExecutor(1, thread_name_prefix=f"toy-{name}"))

    first = InProcessModel(shared, "k", lambda: create("first"), option="model_path", what="the toy")
    second = InProcessModel(shared, "k", lambda: create("second"), option="model_path", what="the toy")
    first.load()

    def work(model: Toy, stop: threading.Event) -> tuple[str, str, bool]:
        return model.name, threading.current_thread().name, stop.is_set()

    name, thread, stopped = asyncio.run(second.run(work))  # loaded at first use, from the shared copy
    assert created == ["first"] and second.loaded is first.loaded
    assert name == "first" and thread.startswith("toy-first") and not stopped
    first.load().threads.shutdown()


def test_in_process_model_reports_a_model_that_does_not_load_as_a_config_error():
    def broken() -> Toy:
        raise RuntimeError("bad magic")

    model = InProcessModel(SharedModels(), "k", broken, option="model_dir", what="the toy in /nowhere")
    with pytest.raises(AdapterConfigError) as err:
        model.load()
    assert err.value.key == "model_dir" and err.value.message == "cannot load the toy in /nowhere: bad magic"
    narrow = InProcessModel(SharedModels(), "k", broken, option="model_dir", what="x", load_errors=(OSError,))
    with pytest.raises(RuntimeError):  # not a load error this adapter knows: a bug, raised as is
        narrow.load()
