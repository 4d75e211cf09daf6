from __future__ import annotations

import threading
import time

import pytest
import torch

from inference_demo.llama.checkpoint import load_model
from inference_demo.llama.engine import Engine, EngineStopped, QueueFull, open_engine
from inference_demo.llama.generation import SamplingParams, decode_one_token, generate

REQUESTS = [
    ("The for statement", SamplingParams(max_new_tokens=30)),
    ("A class definition", SamplingParams(max_new_tokens=12, temperature=0.8, top_k=40, seed=3)),
    ("The import system", SamplingParams(max_new_tokens=25, temperature=1.0, top_p=0.9, seed=5)),
    ("Exceptions", SamplingParams(max_new_tokens=18)),
    ("The with statement is used to wrap", SamplingParams(max_new_tokens=20)),
]


@pytest.fixture(scope="module")
def engine_model(demo_dir):
    return load_model(demo_dir, max_seq_len=256)


class GatedDecode:
    """Counts decode steps and can hold the engine inside one."""

    def __init__(self) -> None:
        self.steps = 0
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, model, tokens, pos):
        self.gate.wait(timeout=30)
        self.steps += 1
        return decode_one_token(model, tokens, pos)


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_batched_requests_match_running_alone(engine_model, demo_model, demo_tokenizer) -> None:
    alone = [
        generate(demo_model, demo_tokenizer, prompt, params).collect()
        for prompt, params in REQUESTS
    ]
    with Engine(engine_model, demo_tokenizer, max_batch_size=4, max_seq_len=256) as engine:
        first = engine.submit(*REQUESTS[0])
        next(first)  # the others join a batch that is already decoding
        rest = [engine.submit(prompt, params) for prompt, params in REQUESTS[1:]]
        results = [first.result(), *(r.result() for r in rest)]
    for got, expected in zip(results, alone, strict=True):
        assert got.token_ids == expected.token_ids
        assert got.finish_reason == expected.finish_reason
    assert results[0].text.endswith(alone[0].text)  # minus the delta read above


def test_cancel_stops_within_one_step(engine_model, demo_tokenizer) -> None:
    decode = GatedDecode()
    with Engine(engine_model, demo_tokenizer, max_batch_size=2, decode=decode) as engine:
        request = engine.submit("The for statement", SamplingParams(max_new_tokens=200))
        other = engine.submit("Exceptions", SamplingParams(max_new_tokens=200))
        wait_until(lambda: decode.steps >= 3)
        request.cancel()
        at_cancel = decode.steps
        completion = request.result()
        assert completion.finish_reason == "cancelled"
        # One token from prefill, one per decode step it took part in: at most one step after
        # the cancel. (Counting the request's own tokens, not the engine's steps, which go on
        # for the neighbour while this thread waits to run.)
        assert len(completion.token_ids) <= 1 + at_cancel + 1
        assert len(completion.token_ids) < 200
        assert other.result().finish_reason == "length"  # the neighbour is unaffected


def test_queue_positions_and_back_pressure(engine_model, demo_tokenizer) -> None:
    decode = GatedDecode()
    params = SamplingParams(max_new_tokens=5)
    with Engine(engine_model, demo_tokenizer, max_batch_size=1, max_queue=2, decode=decode) as e:
        decode.gate.clear()
        running = e.submit("The for statement", params)
        wait_until(lambda: e.active == 1)
        second, third = e.submit("Exceptions", params), e.submit("Classes", params)
        assert [r.queue_position for r in (running, second, third)] == [0, 1, 2]
        with pytest.raises(QueueFull, match="2 requests are already waiting"):
            e.submit("one too many", params)
        second.cancel()
        wait_until(lambda: third.queue_position == 1)
        assert second.result().finish_reason == "cancelled"
        assert second.result().token_ids == []
        decode.gate.set()
        assert running.result().finish_reason == "length"
        assert third.result().finish_reason == "length"
        assert third.queue_position == 0
        assert third.completion.timings.queued_s > 0


def test_submit_needs_a_running_engine(engine_model, demo_tokenizer) -> None:
    engine = Engine(engine_model, demo_tokenizer, max_batch_size=1)
    with pytest.raises(EngineStopped):
        engine.submit("hello")
    assert not engine.is_running
    engine.start()
    assert engine.is_running
    engine.stop()
    assert not engine.is_running
    with pytest.raises(EngineStopped):
        engine.submit("hello")


def test_engine_failure_reaches_the_request(engine_model, demo_tokenizer) -> None:
    def broken(model, tokens, pos):
        raise RuntimeError("device lost")

    with Engine(engine_model, demo_tokenizer, max_batch_size=1, decode=broken) as engine:
        request = engine.submit("The for statement", SamplingParams(max_new_tokens=5))
        with pytest.raises(RuntimeError, match="device lost"):
            request.result()
        with pytest.raises(EngineStopped):
            engine.submit("again")
        assert not engine.is_running


def test_decode_shapes_are_static(engine_model, demo_tokenizer) -> None:
    shapes = set()

    def spy(model, tokens, pos):
        shapes.add((tuple(tokens.shape), tuple(pos.shape), tokens.data_ptr(), pos.data_ptr()))
        return decode_one_token(model, tokens, pos)

    with Engine(engine_model, demo_tokenizer, max_batch_size=3, decode=spy) as engine:
        for r in [
            engine.submit(p, SamplingParams(max_new_tokens=n)) for p, n in [("A", 3), ("B", 9)]
        ]:
            r.result()
    assert len(shapes) == 1  # same buffers, same [3, 1] shape, whatever the occupancy
    assert next(iter(shapes))[:2] == ((3, 1), (3, 1))


def test_open_engine_on_the_demo_release(demo_dir, demo_model, demo_tokenizer) -> None:
    params = SamplingParams(max_new_tokens=10)
    engine = open_engine(demo_dir, max_batch_size=2, max_seq_len=256)
    try:
        deltas = list(request := engine.submit("The for statement", params))
    finally:
        engine.stop()
    alone = generate(demo_model, demo_tokenizer, "The for statement", params).collect()
    assert "".join(deltas) == alone.text
    assert request.completion.timings.ttft_s > 0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch.compile
def test_compiled_static_decode_matches_eager(engine_model, demo_model, demo_tokenizer) -> None:
    """The path CUDA takes (fullgraph, fixed shapes, full-length cache), compiled on the CPU."""
    from inference_demo.llama.generation import compile_decode

    requests = REQUESTS[:2]
    alone = [generate(demo_model, demo_tokenizer, p, s).collect() for p, s in requests]
    decode = compile_decode(torch.device("cpu"))
    with Engine(engine_model, demo_tokenizer, max_batch_size=2, max_seq_len=64, decode=decode) as e:
        results = [r.result() for r in [e.submit(p, s) for p, s in requests]]
    assert [r.token_ids for r in results] == [a.token_ids for a in alone]
