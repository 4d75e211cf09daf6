"""The generation loop: events, recorded outcome, cancellation, back-pressure, failures."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from django.test import override_settings

from inference_demo import runner, runtime
from inference_demo.llama.generation import SamplingParams, decode_one_token
from inference_demo.models import DemoRequest
from tests.factories import ReleaseFactory, UserFactory

SLUG = "llama-demo"
PROMPT = "The for statement"
SMALL_ENGINE = {"max_batch_size": 2, "max_queue": 4, "max_seq_len": 256}


def make_request(prompt: str = PROMPT, **params) -> DemoRequest:
    values = {"max_new_tokens": 16, "temperature": 0.0, "top_p": 1.0, "seed": 0, **params}
    return DemoRequest.objects.create(
        user=UserFactory(username="runner-user"),
        release=ReleaseFactory(slug=SLUG, name="LLaMA demo"),
        prompt=prompt,
        params=values,
    )


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def kinds(events: list[dict]) -> list[str]:
    return [e["event"] for e in events]


def text_of(events: list[dict]) -> str:
    return "".join(e["text"] for e in events if e["event"] == "delta")


class GatedDecode:
    """Holds the engine inside a decode step until the gate opens."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.steps = 0

    def __call__(self, model, tokens, pos):
        self.gate.wait(timeout=30)
        self.steps += 1
        return decode_one_token(model, tokens, pos)


def fill_both_slots(engine) -> list:
    """Two long requests, both admitted before the (gated) first decode step.

    Submitted while this thread holds the engine's lock, so its thread cannot admit the
    first, prefill it and block in the gated decode with the second still waiting."""
    with engine._cond:
        held = [engine.submit(PROMPT, SamplingParams(max_new_tokens=50)) for _ in range(2)]
    wait_until(lambda: engine.active == 2)
    return held


@pytest.fixture
def small_engine(demo_dir):
    """A small engine of this process, as the in-process transport and the worker use it."""
    runtime.reset()
    with override_settings(DEMO_ENGINE=SMALL_ENGINE, DEMO_DEVICE="cpu"):
        yield runtime.get_engine(SLUG)
        runtime.reset()


@pytest.mark.django_db
def test_events_text_and_recorded_outcome(small_engine):
    row = make_request(max_new_tokens=24)
    events = list(runner.run(row.pk))

    assert kinds(events)[:2] == ["queued", "started"]
    assert events[0]["position"] >= 1
    assert set(kinds(events[2:-1])) == {"delta"} and len(events) > 4
    done = events[-1]
    assert done["event"] == "done" and done["finish_reason"] in {"length", "stop"}
    expected = small_engine.submit(PROMPT, SamplingParams(max_new_tokens=24)).result()
    assert text_of(events) == expected.text
    assert done["tokens_in"] == expected.timings.prompt_tokens
    assert done["tokens_out"] == len(expected.token_ids)
    assert done["tokens_per_s"] > 0 and done["duration_ms"] >= done["ttft_ms"] >= 0

    row.refresh_from_db()
    assert row.status == "done" and row.finish_reason == done["finish_reason"]
    assert (row.tokens_in, row.tokens_out) == (done["tokens_in"], done["tokens_out"])
    assert row.ttft_ms == done["ttft_ms"] and row.duration_ms == done["duration_ms"]
    assert row.started_at and row.finished_at and row.error == ""


@pytest.mark.django_db
def test_greedy_output_is_deterministic(small_engine):
    first = list(runner.run(make_request(seed=1).pk))
    second = list(runner.run(make_request(seed=2).pk))
    assert text_of(first) and text_of(first) == text_of(second)


@pytest.mark.django_db
def test_closing_after_first_delta_cancels_and_frees_the_slot(small_engine):
    row = make_request(max_new_tokens=200)
    events = runner.run(row.pk)
    for event in events:
        if event["event"] == "delta":
            break
    events.close()  # the client went away

    wait_until(lambda: small_engine.active == 0, timeout=2)
    row.refresh_from_db()
    assert row.status == "cancelled" and row.finish_reason == "cancelled"
    assert 0 < row.tokens_out < 200
    after = list(runner.run(make_request().pk))
    assert after[-1]["event"] == "done"


@pytest.mark.django_db
def test_should_cancel_ends_with_cancelled_event(small_engine):
    row = make_request(max_new_tokens=200)
    stop = threading.Event()
    events = []
    for event in runner.run(row.pk, should_cancel=stop.is_set):
        events.append(event)
        if event["event"] == "delta":
            stop.set()
    assert events[-1] == {"event": "error", "code": "cancelled", "message": runner.MSG_CANCELLED}
    row.refresh_from_db()
    assert row.status == "cancelled" and row.tokens_out < 200
    wait_until(lambda: small_engine.active == 0, timeout=2)


@pytest.mark.django_db
def test_waiting_request_reports_its_position_and_can_be_cancelled(small_engine):
    gated = GatedDecode()
    small_engine.decode = gated
    holders = fill_both_slots(small_engine)
    row = make_request()
    stop = threading.Event()
    events = []
    for event in runner.run(row.pk, should_cancel=stop.is_set):
        events.append(event)
        if event["event"] == "queued":
            stop.set()
    gated.gate.set()
    for holder in holders:
        holder.cancel()
    assert events[0] == {"event": "queued", "position": 1}
    assert events[-1]["code"] == "cancelled" and "started" not in kinds(events)
    row.refresh_from_db()
    assert row.status == "cancelled" and row.started_at is None


@pytest.mark.django_db
def test_queue_full_answers_busy(small_engine):
    gated = GatedDecode()
    small_engine.decode = gated
    held = fill_both_slots(small_engine)
    held += [small_engine.submit(PROMPT) for _ in range(SMALL_ENGINE["max_queue"])]
    row = make_request()
    try:
        events = list(runner.run(row.pk))
    finally:
        gated.gate.set()
        for request in held:
            request.cancel()
    assert events == [{"event": "error", "code": "busy", "message": runner.MSG_BUSY}]
    row.refresh_from_db()
    assert row.status == "failed" and row.error.startswith("busy: ")


@pytest.mark.django_db
def test_prompt_too_long_for_the_context(small_engine):
    row = make_request(prompt="word " * 400)
    events = list(runner.run(row.pk))
    assert events[-1]["event"] == "error" and events[-1]["code"] == "prompt_too_long"
    row.refresh_from_db()
    assert row.status == "failed" and "PromptTooLong" in row.error


@pytest.mark.django_db
def test_out_of_memory_fails_only_that_request(small_engine, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(small_engine, "submit", out_of_memory)
    row = make_request()
    events = list(runner.run(row.pk))
    assert events == [{"event": "error", "code": "model_error", "message": runner.MSG_OOM}]
    row.refresh_from_db()
    assert row.status == "failed" and "OutOfMemoryError" in row.error
    monkeypatch.undo()

    assert runtime.get_engine(SLUG) is small_engine  # the engine keeps serving
    assert list(runner.run(make_request().pk))[-1]["event"] == "done"


@pytest.mark.django_db
def test_engine_crash_fails_the_request_and_the_next_one_gets_a_fresh_engine(small_engine):
    def broken(model, tokens, pos):
        raise RuntimeError("device-side assert triggered")

    small_engine.decode = broken
    row = make_request()
    events = list(runner.run(row.pk))
    assert events[-1] == {
        "event": "error",
        "code": "model_error",
        "message": runner.MSG_MODEL_ERROR,
    }
    row.refresh_from_db()
    assert row.status == "failed" and "device-side assert" in row.error

    after = list(runner.run(make_request().pk))
    assert after[-1]["event"] == "done"
    assert runtime.get_engine(SLUG) is not small_engine


@pytest.mark.django_db
def test_broken_model_dir_fails_cleanly(small_engine, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "params.json").write_text('{"dim": 64, "n_layers": 2, "n_heads": 4}')
    (broken / "consolidated.00.pth").write_bytes(b"not a checkpoint")
    row = make_request()
    with override_settings(DEMO_MODELS={SLUG: broken}):
        runtime.reset()
        events = list(runner.run(row.pk))
    assert events[-1]["event"] == "error" and events[-1]["code"] == "model_error"
    row.refresh_from_db()
    assert row.status == "failed" and row.error.startswith("model_error: ")

    assert list(runner.run(make_request().pk))[-1]["event"] == "done"


@pytest.mark.django_db
def test_missing_model_is_unavailable(tmp_path):
    row = make_request()
    with override_settings(DEMO_MODELS={SLUG: tmp_path / "nowhere"}):
        runtime.reset()
        events = list(runner.run(row.pk))
    assert events == [{"event": "error", "code": "unavailable", "message": runner.MSG_UNAVAILABLE}]
    row.refresh_from_db()
    assert row.status == "failed"


@pytest.mark.django_db
def test_a_request_that_already_ended_is_not_generated(small_engine):
    row = make_request()
    row.status = "failed"
    row.save()
    assert list(runner.run(row.pk)) == [
        {"event": "error", "code": "cancelled", "message": runner.MSG_ENDED}
    ]
    row.refresh_from_db()
    assert row.status == "failed" and row.tokens_out == 0
