"""A demo release answered by llama.cpp's server (llama-cpp-python) over HTTP.

Not named test_*, so `make test` never collects it: `python -m prove --only llamacpp`
(prove/llama_cpp.py) builds llama-cpp-python, converts the demo model to GGUF, starts
`python -m llama_cpp.server` and runs this module with

    LLAMACPP_BASE_URL   the server's OpenAI base URL, up to /v1
    LLAMACPP_MODEL      its --model_alias
    LLAMACPP_API_KEY    its --api_key
    LLAMACPP_N_CTX      its --n_ctx
    LLAMACPP_SERVER_LOG its log (Stop is checked on the server's side there)
    LLAMACPP_REPORT     optional: a JSON file for the figures the scenario reports

The same runner, transport, page and records as the built-in engine; only
DEMO_OPENAI_BACKENDS points llama-demo at the server.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from django.test import override_settings

from inference_demo import runner, runtime, transport
from inference_demo.backend_config import OpenAIBackendConfig
from inference_demo.models import DemoRequest
from tests.inference_demo.test_runner import kinds, make_request, text_of, wait_until
from tests.inference_demo.test_views import (  # noqa: F401 (fixtures)
    BODY,
    DEMO,
    GENERATE,
    demo_release,
    embedded,
    grantee,
    read_events,
)

# ruff: noqa: F811  (the fixtures imported from test_views are parameters here)

PROMPT = "The for statement"
PROMPTS = (
    PROMPT,
    "Once upon a time",
    "def f(x):\n    return",
    "  leading spaces and ünïcode é",
    "import",
    "A class",
)
LONG_GREEDY = 96  # tokens: long enough for llama.cpp's default repeat penalty to bite
DISCONNECTED = "Disconnected from client"  # what llama_cpp.server logs when a client goes
EVAL_RUNS = re.compile(r"eval time = .* / +(\d+) runs")


@dataclass(frozen=True)
class Remote:
    base_url: str
    model: str
    api_key: str
    n_ctx: int
    log: Path

    def client(self, api_key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.base_url, api_key=api_key or self.api_key, max_retries=0, timeout=60
        )


@pytest.fixture(scope="module")
def remote() -> Remote:
    names = ("BASE_URL", "MODEL", "API_KEY", "N_CTX", "SERVER_LOG")
    values = {name: os.environ.get(f"LLAMACPP_{name}", "") for name in names}
    missing = [f"LLAMACPP_{name}" for name, value in values.items() if not value]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not set: run this module through "
            "`.venv/bin/python -m prove --only llamacpp`, which starts llama.cpp's server"
        )
    return Remote(
        values["BASE_URL"],
        values["MODEL"],
        values["API_KEY"],
        int(values["N_CTX"]),
        Path(values["SERVER_LOG"]),
    )


@pytest.fixture(scope="module")
def figures() -> Iterator[dict]:
    """What the prove scenario reports, written once the module is done."""
    found: dict = {}
    yield found
    if path := os.environ.get("LLAMACPP_REPORT"):
        Path(path).write_text(json.dumps(found, indent=2, ensure_ascii=False) + "\n")


@pytest.fixture(scope="module")
def builtin(demo_dir: Path):
    from inference_demo.llama.engine import open_engine

    engine = open_engine(demo_dir, max_batch_size=1, max_seq_len=1024)
    yield engine
    engine.stop()


def greedy(engine, prompt: str, max_new_tokens: int):
    from inference_demo.llama.generation import SamplingParams

    return engine.submit(prompt, SamplingParams(max_new_tokens=max_new_tokens)).result()


def agreeing_tokens(engine, prompt: str, ours, text: str) -> int:
    """How many of the built-in engine's greedy tokens `text` starts with."""
    tokenizer = engine.tokenizer
    prompt_ids = tokenizer.encode(prompt, bos=True, eos=False)
    head = len(tokenizer.decode(prompt_ids))

    def completion(ids: list[int]) -> str:
        return tokenizer.decode(prompt_ids + ids)[head:]

    ids = list(ours.token_ids)
    assert completion(ids) == ours.text  # the yardstick decodes like the engine streams
    return max(k for k in range(len(ids) + 1) if text.startswith(completion(ids[:k])))


@pytest.fixture
def backend(remote: Remote, embedded) -> Iterator[OpenAIBackendConfig]:
    config = OpenAIBackendConfig(DEMO, remote.base_url, remote.model, remote.api_key)
    runtime.reset()
    with override_settings(DEMO_OPENAI_BACKENDS={DEMO: config}):
        yield config
        runtime.reset()


def use_backend(remote: Remote, **changes) -> override_settings:
    values = {"base_url": remote.base_url, "model": remote.model, "api_key": remote.api_key}
    config = OpenAIBackendConfig(DEMO, **{**values, **changes})
    return override_settings(DEMO_OPENAI_BACKENDS={DEMO: config})


# --- the runner over HTTP ------------------------------------------------------------------


@pytest.mark.django_db
def test_the_runner_streams_from_llamacpp_and_records_its_outcome(
    backend, remote, builtin, figures
):
    expected = greedy(builtin, PROMPT, 24)
    row = make_request(PROMPT, max_new_tokens=24)
    events = list(runner.run(row.pk))

    assert kinds(events)[:2] == ["queued", "started"]
    deltas = [e for e in events if e["event"] == "delta"]
    assert len(deltas) >= 2  # streamed, not one block
    done = events[-1]
    assert done["event"] == "done" and done["finish_reason"] == "length"
    assert text_of(events) == expected.text
    row.refresh_from_db()
    assert (row.status, row.finish_reason) == ("done", "length")
    assert (row.tokens_in, row.tokens_out) == (done["tokens_in"], done["tokens_out"])
    assert row.ttft_ms is not None and row.duration_ms >= row.ttft_ms

    # llama-cpp-python ignores stream_options.include_usage: no usage chunk arrives, so
    # the record falls back to one token per delta and knows no prompt tokens.
    stream = remote.client().completions.create(
        model=remote.model,
        prompt=PROMPT,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert not [chunk for chunk in stream if getattr(chunk, "usage", None)]
    counted = remote.client().completions.create(
        model=remote.model, prompt=PROMPT, max_tokens=24, temperature=0
    )
    assert counted.usage.prompt_tokens == expected.timings.prompt_tokens  # same BOS handling
    # Every token here is whole text, so the server's chunks (the runner may merge some
    # into one delta event) count the 24 tokens exactly; the prompt's are unknown.
    assert (row.tokens_in, row.tokens_out) == (0, counted.usage.completion_tokens)
    figures["runner"] = {
        "deltas": len(deltas),
        "ttft_ms": row.ttft_ms,
        "greedy_24_tokens_identical": True,
        "recorded_tokens_in_out": [row.tokens_in, row.tokens_out],
        "server_usage_unstreamed": [counted.usage.prompt_tokens, counted.usage.completion_tokens],
        "usage_in_stream": "none: llama-cpp-python ignores stream_options.include_usage",
    }


def test_greedy_text_equals_the_builtin_engines_with_the_repeat_penalty_off(
    remote, builtin, figures
):
    """Same weights, tokenizer and BOS: token for token, once llama.cpp samples plainly."""
    client = remote.client()
    for prompt in PROMPTS:
        ours = greedy(builtin, prompt, LONG_GREEDY)
        theirs = client.completions.create(
            model=remote.model,
            prompt=prompt,
            max_tokens=LONG_GREEDY,
            temperature=0,
            extra_body={"repeat_penalty": 1.0},
        )
        assert theirs.choices[0].text == ours.text, prompt
        assert theirs.usage.prompt_tokens == ours.timings.prompt_tokens, prompt
        assert theirs.usage.completion_tokens == len(ours.token_ids) == LONG_GREEDY, prompt
    figures["greedy_repeat_penalty_off"] = (
        f"{len(PROMPTS)}/{len(PROMPTS)} prompts identical to the built-in engine over "
        f"{LONG_GREEDY} tokens (text, prompt and completion token counts)"
    )


@pytest.mark.django_db
def test_through_the_portal_llamacpp_applies_its_default_repeat_penalty(
    backend, remote, builtin, figures
):
    """The portal sends no repeat_penalty, so llama.cpp's default (1.1) shapes long text."""
    client = remote.client()
    agreement = {}
    for prompt in PROMPTS:
        ours = greedy(builtin, prompt, LONG_GREEDY)
        row = make_request(prompt, max_new_tokens=LONG_GREEDY)
        events = list(runner.run(row.pk))
        assert events[-1]["event"] == "done", events[-1]
        penalised = client.completions.create(
            model=remote.model,
            prompt=prompt,
            max_tokens=LONG_GREEDY,
            temperature=0,
            extra_body={"repeat_penalty": 1.1},
        )
        assert text_of(events) == penalised.choices[0].text, prompt
        agreement[prompt] = agreeing_tokens(builtin, prompt, ours, text_of(events))
    identical = sum(k == LONG_GREEDY for k in agreement.values())
    figures["greedy_through_portal"] = {
        "identical_prompts": f"{identical}/{len(PROMPTS)} over {LONG_GREEDY} tokens",
        "tokens_agreeing_before_the_penalty_diverges": agreement,
        "cause": "llama-cpp-python's /v1/completions default repeat_penalty 1.1 "
        "(the portal sends none)",
    }


@pytest.mark.django_db
def test_stop_sequences_reach_llamacpp(backend, builtin):
    text = greedy(builtin, PROMPT, 24).text
    stop = text.strip()[len(text.strip()) // 2 :][:3]
    row = make_request(PROMPT, max_new_tokens=24, stop=[stop])
    events = list(runner.run(row.pk))
    assert text_of(events) == text[: text.index(stop)]
    assert events[-1]["finish_reason"] == "stop"


@pytest.mark.django_db
def test_the_builtin_engine_is_never_loaded_for_the_llamacpp_slug(backend):
    assert type(runtime.get_engine(DEMO)).__name__ == "OpenAIBackend"
    assert runtime.model_dir(DEMO) is None
    assert transport.demo_available(DEMO) is True  # GET /v1/models with the key


@pytest.mark.django_db
def test_stop_mid_stream_ends_llamacpps_generation(backend, remote, figures):
    asked = remote.n_ctx - 16  # as long as llama.cpp's context allows after the prompt
    log_start = len(remote.log.read_text(errors="replace"))
    row = make_request(PROMPT, max_new_tokens=asked, temperature=0.8, top_p=0.9, seed=1)
    events: list[dict] = []
    for event in transport.stream_request(row):
        events.append(event)
        if event["event"] == "delta" and len(events) < 100:
            transport.cancel_request(row.pk)  # the Stop button, while text streams

    assert events[-1] == {"event": "error", "code": "cancelled", "message": runner.MSG_CANCELLED}
    row.refresh_from_db()
    assert (row.status, row.finish_reason) == ("cancelled", "cancelled")
    assert 0 < row.tokens_out < asked

    def since() -> str:
        return remote.log.read_text(errors="replace")[log_start:]

    wait_until(lambda: DISCONNECTED in since(), timeout=15)
    # One more request: the server runs one at a time, so a generation still going on
    # would finish (and log its eval runs) before this one is answered.
    remote.client().completions.create(model=remote.model, prompt=PROMPT, max_tokens=2)
    runs = [int(n) for n in EVAL_RUNS.findall(since())]
    assert all(n < asked - 1 for n in runs), runs
    figures["stop"] = {
        "asked": asked,
        "tokens_out": row.tokens_out,
        "server_logged": DISCONNECTED,
        "server_eval_runs_after": runs,
    }


# --- failures --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_wrong_api_key_is_unavailable_not_a_crash(remote, embedded, figures):
    runtime.reset()
    with use_backend(remote, api_key="sk-wrong"):
        assert transport.demo_available(DEMO) is False  # /v1/models answers 401
        row = make_request(PROMPT)
        events = list(runner.run(row.pk))
    runtime.reset()
    assert events == [{"event": "error", "code": "unavailable", "message": runner.MSG_UNAVAILABLE}]
    row.refresh_from_db()
    assert row.status == "failed" and row.error.startswith("unavailable: ModelUnavailable: ")
    assert "answered 401" in row.error
    figures["wrong_key"] = row.error[:200]


@pytest.mark.django_db
def test_llamacpp_serves_its_one_model_under_any_name(remote, embedded, figures):
    """Unlike vLLM or inference_demo.serve (404, so "unavailable"), llama-cpp-python
    answers a wrong model name with the model it has: a typo there goes unnoticed."""
    runtime.reset()
    with use_backend(remote, model="no-such-model"):
        row = make_request(PROMPT, max_new_tokens=4)
        events = list(runner.run(row.pk))
    runtime.reset()
    assert events[-1]["event"] == "done" and text_of(events)
    figures["wrong_model"] = "served by llama-cpp-python (it ignores the name)"


OVER_CONTEXT_WORDS = 512  # about two tokens a word: twice LLAMACPP_N_CTX's 512


def test_llamacpp_refuses_a_prompt_over_its_context_only_unstreamed(remote, figures):
    """The server's side, so a change in llama-cpp-python shows here. Unstreamed, it
    answers 400 context_length_exceeded. Streamed, it checks the context inside the
    response's generator, usually after sending 200: the stream then ends with no chunk
    (or breaks off), and the kept-alive connection is dropped unannounced."""
    prompt = " ".join(["word"] * OVER_CONTEXT_WORDS)
    with remote.client() as client, pytest.raises(openai.BadRequestError) as unstreamed:
        client.completions.create(model=remote.model, prompt=prompt, max_tokens=8)
    assert unstreamed.value.code == "context_length_exceeded"
    outcomes: Counter[str] = Counter()
    for _ in range(5):
        with remote.client() as client:  # a fresh connection each time
            try:
                stream = client.completions.create(
                    model=remote.model, prompt=prompt, max_tokens=8, stream=True
                )
                outcomes[f"200, {len(list(stream))} chunks"] += 1
            except openai.APIStatusError as exc:
                outcomes[f"{exc.status_code} {exc.code}"] += 1
            except (openai.APIConnectionError, httpx.HTTPError) as exc:
                outcomes[f"broken: {type(exc).__name__}"] += 1
    figures["over_context_streamed_by_llamacpp"] = dict(outcomes)
    assert set(outcomes) <= {"200, 0 chunks", "400 context_length_exceeded"} | {
        k for k in outcomes if k.startswith("broken: ")
    }, outcomes  # never text past its context


@pytest.mark.django_db
def test_a_prompt_over_llamacpps_context_fails_and_the_next_request_is_served(
    backend, remote, figures
):
    """What the portal must do whatever the server's way of refusing: end the request as
    an error (prompt_too_long when the server says so), never "done" with no text, and
    answer the next request on the same client (three rounds, as the outcome varies)."""
    rounds = []
    for _ in range(3):
        row = make_request(" ".join(["word"] * OVER_CONTEXT_WORDS), max_new_tokens=8)
        events = list(runner.run(row.pk))
        row.refresh_from_db()
        after = make_request(PROMPT, max_new_tokens=4)
        next_events = list(runner.run(after.pk))  # the same backend client and pool
        rounds.append((events[-1], row, next_events[-1]))
    figures["context"] = [
        {"over_context": over, "row": [row.status, row.error[:160]], "next_request": nxt}
        for over, row, nxt in rounds
    ]
    for over, row, nxt in rounds:
        assert over["event"] == "error", over
        assert over["code"] in ("prompt_too_long", "model_error"), over
        if over["code"] == "prompt_too_long":
            assert f"maximum context length is {remote.n_ctx} tokens" in over["message"]
        assert row.status == "failed"
        assert nxt["event"] == "done", nxt


@pytest.mark.django_db
def test_new_tokens_past_the_context_are_cut_to_what_fits(backend, remote, builtin):
    """llama.cpp refuses only a prompt over its context; it shortens max_tokens to fit."""
    prompt = " ".join(["word"] * (remote.n_ctx // 4))
    prompt_tokens = len(builtin.tokenizer.encode(prompt, bos=True, eos=False))
    asked = remote.n_ctx - prompt_tokens + 64
    row = make_request(prompt, max_new_tokens=asked)
    events = list(runner.run(row.pk))
    assert events[-1]["event"] == "done" and events[-1]["finish_reason"] == "length", events[-1]
    row.refresh_from_db()
    assert 0 < row.tokens_out <= remote.n_ctx - prompt_tokens < asked


# --- the page --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_demo_page_streams_from_llamacpp(client, grantee, backend):
    client.force_login(grantee)
    events = read_events(client.post(GENERATE, {**BODY, "prompt": PROMPT, "max_new_tokens": 12}))
    names = [name for name, _ in events]
    assert names[0] == "request" and names[-1] == "done", events
    assert "".join(data["text"] for name, data in events if name == "delta")
    row = DemoRequest.objects.get()
    assert (row.user, row.status, row.tokens_out) == (grantee, "done", events[-1][1]["tokens_out"])
