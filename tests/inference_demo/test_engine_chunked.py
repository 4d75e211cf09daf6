"""Chunked prefill and batched sampling in the engine.

A small random model with a long context (2,304 positions) and the demo tokenizer's
vocabulary: prompts are token ids, so 2,000-token prompts cost milliseconds. Expected
tokens come from ``generate`` on a second copy of the weights, alone and unchunked.
Latency is proven by counting the prompt tokens the engine prefilled between two tokens
of a decoding row (its ``prefill_tokens`` counter, read in a decode hook), not by clocks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from inference_demo.llama import engine as engine_module
from inference_demo.llama.engine import Engine, Request
from inference_demo.llama.generation import (
    Completion,
    RowSampling,
    SamplingParams,
    decode_one_token,
    generate,
    prefill,
    sample,
    sample_rows,
)
from inference_demo.llama.model import ModelArgs, Transformer
from tests.inference_demo.conftest import random_state_dict

ARGS = dict(
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=2048,  # the demo tokenizer's
    multiple_of=16,
    norm_eps=1e-5,
    max_seq_len=2304,
)
CONTEXT = ARGS["max_seq_len"]
DEADLINE_S = 60.0
GREEDY = SamplingParams(max_new_tokens=24, ignore_eos=True)


class Boom(RuntimeError):
    """The injected failure."""


def tiny_model() -> Transformer:
    model = Transformer(ModelArgs.from_params(ARGS))
    model.load_state_dict(random_state_dict(ARGS, seed=3))
    return model.eval()


@pytest.fixture(scope="module")
def alone_model() -> Transformer:
    model = tiny_model()
    model.setup_caches(max_batch_size=1, max_seq_len=CONTEXT)
    return model


@pytest.fixture(scope="module")
def engine_model() -> Transformer:
    return tiny_model()


def prompt(n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [1, *torch.randint(3, ARGS["vocab_size"], (n - 1,), generator=gen).tolist()]


@pytest.fixture(scope="module")
def alone(alone_model, demo_tokenizer) -> Callable[[list[int], SamplingParams], Completion]:
    cache: dict[tuple[tuple[int, ...], SamplingParams], Completion] = {}

    def run(ids: list[int], params: SamplingParams) -> Completion:
        key = (tuple(ids), params)
        if key not in cache:
            cache[key] = generate(alone_model, demo_tokenizer, ids, params).collect()
        return cache[key]

    return run


class DecodeLog:
    """Wraps the engine's decode: per decode step, the prefill tokens run so far and the
    requests that get a token from the step."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.decode = engine, engine.decode
        self.steps: list[tuple[int, tuple[int, ...]]] = []
        self.on_step: Callable[[int], None] | None = None
        engine.decode = self

    def __call__(self, model, tokens, pos):
        rows = self.engine._decoding()
        ids = tuple(self.engine.slots[s].id for s in rows)  # type: ignore[union-attr]
        self.steps.append((self.engine.prefill_tokens, ids))
        if self.on_step is not None:
            self.on_step(len(self.steps))
        return self.decode(model, tokens, pos)

    def prefill_between_tokens(self, request: Request, since: int = 0) -> list[int]:
        """Prompt tokens prefilled between each two consecutive decode tokens of ``request``
        (from the step where ``since`` tokens were prefilled)."""
        seen = [done for done, ids in self.steps if request.id in ids and done >= since]
        return [b - a for a, b in zip(seen, seen[1:], strict=False)]

    def prefilled_at_steps_of(self, requests: list[Request]) -> set[int]:
        """The prefill counter at each decode step that gave all ``requests`` a token."""
        return {done for done, ids in self.steps if {r.id for r in requests} <= set(ids)}


class ChunkLog:
    """Wraps ``prefill`` in the engine module: records (first_row, start, length) per chunk."""

    def __init__(self, monkeypatch, fail: Callable[[int, int, int], bool] | None = None):
        self.chunks: list[tuple[int, int, int]] = []
        self.fail = fail
        self.after: Callable[[Transformer, int, int], None] | None = None  # (model, row, end)
        monkeypatch.setattr(engine_module, "prefill", self)

    def __call__(self, model, ids, first_row=0, *, start=0):
        self.chunks.append((first_row, start, len(ids)))
        if self.fail is not None and self.fail(first_row, start, len(ids)):
            raise Boom("prefill chunk exploded")
        logits = prefill(model, ids, first_row, start=start)
        if self.after is not None:
            self.after(model, first_row, start + len(ids))
        return logits


def cache_row(model: Transformer, row: int, end: int) -> list[torch.Tensor]:
    """Every layer's keys and values of cache ``row`` over positions [0, end)."""
    caches = [layer.attention.cache for layer in model.layers]
    return [t[row, :, :end].clone() for c in caches for t in (c.k, c.v)]


def outcome(request: Request, timeout: float = DEADLINE_S) -> Completion | BaseException:
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


def served(request: Request) -> Completion:
    result = outcome(request)
    assert isinstance(result, Completion), result
    return result


def wait_until(predicate: Callable[[], bool], timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


@pytest.fixture
def make_engine(engine_model, demo_tokenizer) -> Iterator[Callable[..., Engine]]:
    engines: list[Engine] = []

    def make(**options: Any) -> Engine:
        engine = Engine(
            engine_model, demo_tokenizer, max_seq_len=CONTEXT, **{"max_batch_size": 3, **options}
        )
        engines.append(engine.start())
        return engine

    yield make
    for engine in engines:
        engine.stop()


def busy(engine: Engine, n: int = 2, max_new_tokens: int = 1000) -> list[Request]:
    """``n`` short greedy requests, all decoding when this returns."""
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    requests = [engine.submit(prompt(5 + i, seed=100 + i), params) for i in range(n)]
    wait_until(lambda: len(engine._decoding()) == n)
    return requests


# The model: a prompt prefilled chunk by chunk attends to its cached earlier chunks.


def test_chunked_prefill_gives_the_logits_of_a_whole_prefill(engine_model) -> None:
    engine_model.setup_caches(max_batch_size=3, max_seq_len=CONTEXT)
    ids = prompt(700, seed=1)
    with torch.inference_mode():
        whole = prefill(engine_model, ids, first_row=0)
        for start in range(0, len(ids), 128):
            chunked = prefill(engine_model, ids[start : start + 128], first_row=2, start=start)
        uncached = tiny_model()(torch.tensor([ids]), torch.arange(len(ids)).unsqueeze(0))[0, -1]
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(chunked, uncached, rtol=1e-4, atol=1e-4)


# The engine: chunks interleave with decode steps and change no token.


def test_a_prompt_prefilled_in_chunks_while_others_decode_gives_the_same_tokens(
    make_engine, alone, monkeypatch
) -> None:
    chunks = ChunkLog(monkeypatch)
    engine = make_engine(prefill_chunk=128)
    log = DecodeLog(engine)
    running = busy(engine, max_new_tokens=60)
    long_ids = prompt(700, seed=1)
    prefilled: list[torch.Tensor] = []
    chunks.after = lambda model, row, end: (
        prefilled.extend(cache_row(model, row, end)) if end == len(long_ids) else None
    )
    long = engine.submit(long_ids, GREEDY)

    assert served(long).token_ids == alone(long_ids, GREEDY).token_ids
    # The row's cache once prefilled is the whole prompt's: no padded decode step, which
    # writes into this row too, left anything in it (a greedy continuation alone would not
    # notice one spoilt position out of 700).
    fresh = tiny_model()
    fresh.setup_caches(max_batch_size=1, max_seq_len=CONTEXT)
    with torch.inference_mode():
        prefill(fresh, long_ids)
    for got, expected in zip(prefilled, cache_row(fresh, 0, len(long_ids)), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert [(start, n) for slot, start, n in chunks.chunks if slot == 2] == [
        (128 * i, 128 if i < 5 else 60) for i in range(6)
    ]
    # A decode step ran after each chunk but the last, padding the prefilling row (its slot
    # in the fixed-shape step writes that row's cache) while the neighbours decoded.
    before = 5 + 6  # the neighbours' prompts
    assert {before + 128 * k for k in range(1, 6)} <= log.prefilled_at_steps_of(running)
    for i, request in enumerate(running):
        got = served(request)
        params = SamplingParams(max_new_tokens=60, ignore_eos=True)
        assert got.token_ids == alone(prompt(5 + i, seed=100 + i), params).token_ids


def test_a_joining_2000_token_prompt_delays_decoding_rows_by_one_chunk(make_engine) -> None:
    engine = make_engine(prefill_chunk=256)
    log = DecodeLog(engine)
    running = busy(engine)
    before = engine.prefill_tokens
    long = engine.submit(prompt(2000, seed=2), GREEDY)
    assert len(served(long).token_ids) == GREEDY.max_new_tokens
    assert engine.prefill_tokens - before == 2000
    assert engine.prefill_chunks == 2 + 8  # two short prompts, 7 x 256 + 208
    for request in running:
        gaps = log.prefill_between_tokens(request, since=before)
        assert max(gaps) == 256  # the long prompt ran between this row's tokens...
        assert sum(gaps) == 2000  # ...all of it, one chunk at most between two tokens
        request.cancel()


def test_unchunked_the_same_prompt_delays_them_by_all_of_it(make_engine) -> None:
    """The counter above does see the stall chunking removes."""
    engine = make_engine(prefill_chunk=None)
    log = DecodeLog(engine)
    running = busy(engine)
    served(engine.submit(prompt(2000, seed=2), GREEDY))
    assert engine.prefill_chunks == 3
    for request in running:
        assert max(log.prefill_between_tokens(request)) == 2000
        request.cancel()


def test_cancelling_a_prefilling_request_frees_its_slot_at_the_next_iteration(
    make_engine, monkeypatch, alone
) -> None:
    chunks = ChunkLog(monkeypatch)
    engine = make_engine(prefill_chunk=64)
    running = busy(engine, max_new_tokens=80)
    gate = threading.Event()

    def target_chunks() -> int:
        return sum(1 for _, _, n in chunks.chunks if n == 64)

    log = DecodeLog(engine)
    log.on_step = lambda _: gate.wait(DEADLINE_S) if target_chunks() >= 2 else None
    long = engine.submit(prompt(1500, seed=4), GREEDY)
    wait_until(lambda: target_chunks() >= 2)  # held in the decode step after its 2nd chunk
    assert long.queue_position == 0  # admitted: no longer waiting
    assert engine.active == 3
    long.cancel()
    gate.set()
    result = served(long)
    assert (result.finish_reason, result.token_ids) == ("cancelled", [])
    wait_until(lambda: engine.active == 2)
    assert target_chunks() == 2  # no chunk ran after the cancel
    for i, request in enumerate(running):  # the neighbours are untouched
        params = SamplingParams(max_new_tokens=80, ignore_eos=True)
        assert served(request).token_ids == alone(prompt(5 + i, seed=100 + i), params).token_ids


def test_a_failing_second_chunk_ends_only_its_request(make_engine, monkeypatch, alone) -> None:
    long_ids = prompt(600, seed=5)
    ChunkLog(monkeypatch, fail=lambda slot, start, n: start == 128)
    engine = make_engine(prefill_chunk=128)
    running = busy(engine, max_new_tokens=40)
    long = engine.submit(long_ids, GREEDY)
    later = engine.submit(prompt(90, seed=6), GREEDY)  # waits for the slot the failure frees

    result = outcome(long)
    assert isinstance(result, Boom), result
    assert "llama engine: prefill failed" in result.__notes__
    assert served(later).token_ids == alone(prompt(90, seed=6), GREEDY).token_ids
    for i, request in enumerate(running):
        params = SamplingParams(max_new_tokens=40, ignore_eos=True)
        assert served(request).token_ids == alone(prompt(5 + i, seed=100 + i), params).token_ids
    assert engine.is_running
    wait_until(lambda: engine.active == 0)


def test_a_failing_decode_step_spares_a_prefilling_request(make_engine, alone) -> None:
    """The probe after a failed step pads the prefilling row where its next chunk writes."""
    engine = make_engine(prefill_chunk=128)
    decode, failed = engine.decode, []

    def failing(model, tokens, pos):
        if engine.prefilling and engine._decoding() and not failed:
            failed.extend(engine.slots[s] for s in engine._decoding())
            raise Boom("decode exploded")
        return decode(model, tokens, pos)

    running = busy(engine, max_new_tokens=300)
    engine.decode = failing
    long_ids = prompt(900, seed=7)
    long = engine.submit(long_ids, GREEDY)
    assert served(long).token_ids == alone(long_ids, GREEDY).token_ids
    assert failed == running
    for request in running:
        result = outcome(request)
        assert isinstance(result, Boom) and "llama engine: decode failed" in result.__notes__


# Batched sampling: one call for the sampled rows, per-request seeds hold.

SAMPLED = [
    SamplingParams(max_new_tokens=30, temperature=0.8, top_k=40, seed=3, ignore_eos=True),
    SamplingParams(max_new_tokens=30, temperature=1.0, top_p=0.9, seed=5, ignore_eos=True),
    SamplingParams(max_new_tokens=30, temperature=1.3, top_k=200, top_p=0.8, seed=9),
]


class SampleRowsLog:
    """Wraps ``sample_rows`` in the engine module: records (rows, raised) per call."""

    def __init__(self, monkeypatch, fail: Callable[[RowSampling], bool] | None = None) -> None:
        self.calls: list[tuple[int, bool]] = []
        self.fail = fail
        monkeypatch.setattr(engine_module, "sample_rows", self)

    def __call__(self, logits, rows, noise):
        raised = self.fail is not None and self.fail(rows)
        self.calls.append((logits.shape[0], raised))
        if raised:
            raise Boom("sampling exploded")
        return sample_rows(logits, rows, noise)


def test_sampled_rows_are_one_call_and_seeded_requests_match_running_alone(
    make_engine, monkeypatch, alone
) -> None:
    calls = SampleRowsLog(monkeypatch)
    per_row: list[SamplingParams] = []

    def counting_sample(logits, params, generator):
        per_row.append(params)
        return sample(logits, params, generator)

    monkeypatch.setattr(engine_module, "sample", counting_sample)
    engine = make_engine(prefill_chunk=100, max_batch_size=4)
    running = busy(engine, n=1, max_new_tokens=200)  # a greedy neighbour
    prompts = [prompt(n, seed=20 + n) for n in (7, 333, 30)]  # one prefills in 4 chunks
    requests = [engine.submit(ids, p) for ids, p in zip(prompts, SAMPLED, strict=True)]
    for ids, params, request in zip(prompts, SAMPLED, requests, strict=True):
        assert served(request).token_ids == alone(ids, params).token_ids
    running[0].cancel()
    assert (3, False) in calls.calls  # the three sampled rows in one call
    # Per request, sample() ran once: for the first token, after the prompt's last chunk.
    assert sorted(id(p) for p in per_row if p.temperature > 0) == sorted(map(id, SAMPLED))


def test_a_failing_batched_sampling_call_ends_only_the_row_that_fails_alone(
    make_engine, monkeypatch, alone
) -> None:
    target = SAMPLED[0]
    seen = {"calls": 0}

    def fail(rows: RowSampling) -> bool:
        if bool((rows.temperature == target.temperature).any()):
            seen["calls"] += 1
            return seen["calls"] >= 3
        return False

    calls = SampleRowsLog(monkeypatch, fail=fail)
    engine = make_engine(max_batch_size=3)
    prompts = [prompt(n, seed=40 + n) for n in (6, 9, 12)]
    requests = [engine.submit(ids, p) for ids, p in zip(prompts, SAMPLED, strict=True)]

    result = outcome(requests[0])
    assert isinstance(result, Boom), result
    assert "llama engine: sampling failed" in result.__notes__
    for ids, params, request in zip(prompts[1:], SAMPLED[1:], requests[1:], strict=True):
        assert served(request).token_ids == alone(ids, params).token_ids  # retried exactly
    # The failed batched call, then each of its rows alone: only the target's fails again.
    failed_at = next(i for i, (n, raised) in enumerate(calls.calls) if raised)
    rows = calls.calls[failed_at][0]
    assert rows >= 2
    retries = calls.calls[failed_at + 1 : failed_at + 1 + rows]
    assert sorted(retries) == [(1, False)] * (rows - 1) + [(1, True)]
    assert engine.is_running


# Timestamps for inter-token latency.


def test_completions_carry_a_timestamp_per_token(make_engine, alone_model, demo_tokenizer):
    engine = make_engine()
    completions = [
        served(engine.submit(prompt(40, seed=8), GREEDY)),
        generate(alone_model, demo_tokenizer, prompt(40, seed=8), GREEDY).collect(),
    ]
    for completion in completions:
        times, t = completion.token_times, completion.timings
        assert len(times) == len(completion.token_ids) == GREEDY.max_new_tokens
        assert times == sorted(times)
        assert times[0] == t.ttft_s and 0 < times[-1] <= t.total_s


def test_prefill_chunk_must_be_positive(engine_model, demo_tokenizer) -> None:
    with pytest.raises(ValueError, match="prefill_chunk"):
        Engine(engine_model, demo_tokenizer, max_batch_size=1, prefill_chunk=0)


def test_decode_keeps_its_fixed_shapes_while_a_prompt_prefills(make_engine) -> None:
    shapes = set()
    engine = make_engine(prefill_chunk=64)
    decode = engine.decode

    def spy(model, tokens, pos):
        shapes.add((tuple(tokens.shape), tokens.data_ptr(), pos.data_ptr()))
        return decode_one_token(model, tokens, pos)

    assert decode is decode_one_token
    engine.decode = spy
    running = busy(engine, n=1, max_new_tokens=30)
    served(engine.submit(prompt(500, seed=9), GREEDY))
    served(running[0])
    assert len(shapes) == 1 and next(iter(shapes))[0] == (3, 1)
