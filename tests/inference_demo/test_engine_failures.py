"""The engine survives its failures: the failing request ends with its error, nothing else.

Failures are injected at admission (tokenizing, the first token), in prefill, in a
decode step and in sampling, with several requests running and waiting. Every read
of a request has a deadline, so a request stranded without a final event fails the
test instead of hanging the suite.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from inference_demo import runner, runtime
from inference_demo.llama import engine as engine_module
from inference_demo.llama.checkpoint import load_model
from inference_demo.llama.engine import Engine, EngineStopped, Request
from inference_demo.llama.generation import Completion, SamplingParams, generate
from inference_demo.llama.model import Transformer
from tests.inference_demo.test_runner import SLUG, SMALL_ENGINE, make_request

DEADLINE_S = 20.0

# Greedy and sampled requests, each a distinct SamplingParams object (how a fault finds it).
REQUESTS = [
    ("The for statement", SamplingParams(max_new_tokens=24)),
    ("A class definition", SamplingParams(max_new_tokens=16, temperature=0.8, top_k=40, seed=3)),
    ("The import system", SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=5)),
    ("Exceptions", SamplingParams(max_new_tokens=18)),
]
LATER = ("The with statement is used to wrap", SamplingParams(max_new_tokens=12))


class Boom(RuntimeError):
    """The injected failure."""


@pytest.fixture(scope="module")
def engine_model(demo_dir) -> Transformer:
    return load_model(demo_dir, max_seq_len=256)


@pytest.fixture(scope="module")
def expected(demo_model, demo_tokenizer) -> dict[str, Completion]:
    """Every prompt's completion, generated alone with no failure anywhere."""
    return {
        prompt: generate(demo_model, demo_tokenizer, prompt, params).collect()
        for prompt, params in [*REQUESTS, LATER]
    }


@pytest.fixture
def engine(engine_model, demo_tokenizer) -> Iterator[Engine]:
    with Engine(engine_model, demo_tokenizer, max_batch_size=2, max_seq_len=256) as running:
        yield running


def outcome(request: Request, timeout: float = DEADLINE_S) -> Completion | BaseException:
    """The request's completion or the error it ended with; fails if neither comes in time."""
    box: list[Completion | BaseException] = []

    def read() -> None:
        try:
            box.append(request.result())
        except BaseException as exc:
            box.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if reader.is_alive():
        pytest.fail(f"request {request.id} got no final event within {timeout} s")
    return box[0]


def assert_failed(request: Request, stage: str) -> None:
    started = time.monotonic()
    result = outcome(request)
    assert isinstance(result, Boom), result
    assert f"llama engine: {stage} failed" in result.__notes__
    assert time.monotonic() - started < 5  # the error arrives promptly, not at shutdown


def assert_served(request: Request, prompt: str, expected: dict[str, Completion]) -> None:
    result = outcome(request)
    assert isinstance(result, Completion), result
    assert result.token_ids == expected[prompt].token_ids
    assert result.text == expected[prompt].text
    assert result.finish_reason == expected[prompt].finish_reason


class HeldFirstCall:
    """Wraps a function; its first call waits until ``release`` so submits can queue up."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.released = threading.Event()
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == 1:
            assert self.released.wait(DEADLINE_S)
        return self.fn(*args, **kwargs)


def submit_all(engine: Engine, monkeypatch) -> list[Request]:
    """Submit REQUESTS so that the first two take the slots and the other two wait."""
    held = HeldFirstCall(engine_module.prefill)
    monkeypatch.setattr(engine_module, "prefill", held)
    requests = [engine.submit(prompt, params) for prompt, params in REQUESTS]
    held.released.set()
    return requests


def submit_later(engine: Engine) -> Request:
    return engine.submit(*LATER)


def test_a_failing_prefill_ends_only_its_request(engine, expected, monkeypatch) -> None:
    target = engine.tokenizer.encode(REQUESTS[1][0], bos=True, eos=False)
    prefill = engine_module.prefill

    def failing_prefill(model, ids, first_row=0):
        if list(ids) == target:
            raise Boom("prefill exploded")
        return prefill(model, ids, first_row=first_row)

    monkeypatch.setattr(engine_module, "prefill", failing_prefill)
    requests = submit_all(engine, monkeypatch)

    assert_failed(requests[1], "prefill")
    for (prompt, _), request in zip(REQUESTS, requests, strict=True):
        if request is not requests[1]:
            assert_served(request, prompt, expected)
    assert_served(submit_later(engine), LATER[0], expected)
    assert engine.is_running and engine.active == 0


def test_a_failing_first_token_at_admission_frees_the_slot(engine, expected, monkeypatch) -> None:
    target = REQUESTS[2][1]
    sample = engine_module.sample

    def failing_sample(logits, params, generator):
        if params is target:
            raise Boom("sampling exploded at admission")
        return sample(logits, params, generator)

    monkeypatch.setattr(engine_module, "sample", failing_sample)
    requests = submit_all(engine, monkeypatch)

    assert_failed(requests[2], "prefill")
    for (prompt, _), request in zip(REQUESTS, requests, strict=True):
        if request is not requests[2]:
            assert_served(request, prompt, expected)
    assert_served(submit_later(engine), LATER[0], expected)


def test_a_failing_tokenizer_refuses_at_submit(engine, expected, monkeypatch) -> None:
    encode = engine.tokenizer.encode

    def failing_encode(text, *, bos, eos):
        if text == "poison":
            raise Boom("tokenizer exploded")
        return encode(text, bos=bos, eos=eos)

    monkeypatch.setattr(engine.tokenizer, "encode", failing_encode)
    running = engine.submit(*REQUESTS[0])
    with pytest.raises(Boom, match="tokenizer exploded"):
        engine.submit("poison")
    assert list(engine.waiting) in ([], [running])  # nothing of the refused prompt queued
    assert_served(running, REQUESTS[0][0], expected)
    assert_served(submit_later(engine), LATER[0], expected)


def test_a_failing_sampling_step_ends_only_its_row(engine, expected, monkeypatch) -> None:
    target = REQUESTS[1][1]
    sample_rows = engine_module.sample_rows
    calls = {"target": 0}

    def failing_sample_rows(logits, rows, noise):
        if bool((rows.temperature == target.temperature).any()):
            calls["target"] += 1
            if calls["target"] >= 3:  # from its 3rd decode step: batched, then alone
                raise Boom("sampling exploded in a decode step")
        return sample_rows(logits, rows, noise)

    monkeypatch.setattr(engine_module, "sample_rows", failing_sample_rows)
    requests = submit_all(engine, monkeypatch)

    assert_failed(requests[1], "sampling")
    for (prompt, _), request in zip(REQUESTS, requests, strict=True):
        if request is not requests[1]:
            assert_served(request, prompt, expected)
    assert_served(submit_later(engine), LATER[0], expected)


class FailingDecode:
    """Decodes normally except on the chosen calls; records who was in the failed step."""

    def __init__(self, engine: Engine, fail_from: int, fail_until: int | None = None) -> None:
        self.engine = engine
        self.decode = engine.decode
        self.fail_from, self.fail_until = fail_from, fail_until or fail_from
        self.calls = 0
        self.in_failed_step: list[Request] = []

    def __call__(self, model, tokens, pos):
        self.calls += 1
        if self.fail_from <= self.calls <= self.fail_until:
            if not self.in_failed_step:
                self.in_failed_step = [r for r in self.engine.slots if r is not None]
            raise Boom("decode exploded")
        return self.decode(model, tokens, pos)


def test_a_failing_decode_step_ends_its_rows_and_the_engine_goes_on(
    engine, expected, monkeypatch
) -> None:
    decode = FailingDecode(engine, fail_from=3)
    engine.decode = decode
    requests = submit_all(engine, monkeypatch)

    served = [(p, r) for (p, _), r in zip(REQUESTS, requests, strict=True)]
    for request in decode_failed(decode):
        assert_failed(request, "decode")
    assert [r for _, r in served[:2]] == decode.in_failed_step  # the two running rows
    for prompt, request in served[2:]:  # the waiting ones are served after the failure
        assert_served(request, prompt, expected)
    assert_served(submit_later(engine), LATER[0], expected)
    assert engine.is_running


def decode_failed(decode: FailingDecode) -> list[Request]:
    deadline = time.monotonic() + DEADLINE_S
    while not decode.in_failed_step:
        assert time.monotonic() < deadline, "the failing decode step never ran"
        time.sleep(0.005)
    return decode.in_failed_step


def test_a_decode_that_keeps_failing_ends_every_request_and_stops(engine, monkeypatch) -> None:
    decode = FailingDecode(engine, fail_from=2, fail_until=10**9)
    engine.decode = decode
    requests = submit_all(engine, monkeypatch)

    for request in requests:  # running and waiting: each gets the error, none is stranded
        result = outcome(request)
        assert isinstance(result, Boom), result
    assert decode.calls == 3  # the failed step and one probe on the idle batch, no more
    assert not engine.is_running
    with pytest.raises(EngineStopped):
        submit_later(engine)


def test_a_cancel_that_fails_to_finish_still_gets_an_event(engine, expected, monkeypatch):
    request = engine.submit("The for statement", SamplingParams(max_new_tokens=200))
    next(request)
    state = request._state

    def failing_finish(reason, *, flush=True):
        raise Boom("finishing exploded")

    monkeypatch.setattr(state, "finish", failing_finish)
    request.cancel()
    assert isinstance(outcome(request), Boom)
    assert_served(submit_later(engine), LATER[0], expected)


@pytest.fixture
def small_engine(demo_dir) -> Iterator[Engine]:
    from django.test import override_settings

    runtime.reset()
    with override_settings(DEMO_ENGINE=SMALL_ENGINE, DEMO_DEVICE="cpu"):
        yield runtime.get_engine(SLUG)
        runtime.reset()


@pytest.mark.django_db
def test_the_runner_reports_a_prefill_failure_and_keeps_the_engine(small_engine, monkeypatch):
    def failing_prefill(model, ids, first_row=0):
        raise Boom("prefill exploded")

    monkeypatch.setattr(engine_module, "prefill", failing_prefill)
    row = make_request()
    with deadline(DEADLINE_S):
        events = list(runner.run(row.pk))
    assert events[-1] == {
        "event": "error",
        "code": "model_error",
        "message": runner.MSG_MODEL_ERROR,
    }
    row.refresh_from_db()
    assert row.status == "failed" and "Boom: prefill exploded" in row.error
    monkeypatch.undo()

    with deadline(DEADLINE_S):
        assert list(runner.run(make_request().pk))[-1]["event"] == "done"
    assert runtime.get_engine(SLUG) is small_engine  # the same engine served it


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail the test when the block runs longer (the runner waits on its request forever)."""

    def expired(signum: int, frame: Any) -> None:
        pytest.fail(f"no final event within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
