"""``python -m inference_demo.serve`` as a real process, driven by the official ``openai`` client."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from inference_demo.openai_protocol import CHAT_TURN_STOP, chat_prompt
from inference_demo.serve import ServerState, make_server
from tests.inference_demo.serve_process import Server, serve_process

API_KEY = "sk-test-demo"
MODEL = "demo-llama"
PROMPT = "The for statement"
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def server(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with serve_process(demo_dir, log, model_name=MODEL, api_key=API_KEY) as running:
        yield running


@pytest.fixture(scope="module")
def engine_greedy(demo_dir: Path) -> Any:
    """Our engine's own greedy completion of PROMPT, with the server's engine settings."""
    from inference_demo.llama.engine import open_engine
    from inference_demo.llama.generation import SamplingParams

    engine = open_engine(demo_dir, max_batch_size=1, max_seq_len=1024)
    try:
        return engine.submit(PROMPT, SamplingParams(max_new_tokens=MAX_TOKENS)).result()
    finally:
        engine.stop()


def test_models_list_names_the_served_model(server: Server) -> None:
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"
    assert server.client().models.retrieve(MODEL).id == MODEL


def test_completion_greedy_matches_the_engine_and_the_stream(server: Server, engine_greedy) -> None:
    client = server.client()
    result = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0
    )
    assert result.object == "text_completion"
    assert result.id.startswith("cmpl-")
    assert result.model == MODEL
    [choice] = result.choices
    assert choice.text == engine_greedy.text
    assert choice.finish_reason == engine_greedy.finish_reason == "length"
    assert result.usage.completion_tokens == len(engine_greedy.token_ids) == MAX_TOKENS
    assert result.usage.prompt_tokens == engine_greedy.timings.prompt_tokens
    assert result.usage.total_tokens == result.usage.prompt_tokens + MAX_TOKENS

    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
    assert all(c.object == "text_completion" and c.model == MODEL for c in chunks)
    *text_chunks, usage_chunk = chunks
    assert "".join(c.choices[0].text for c in text_chunks) == choice.text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert len(text_chunks) > 2  # streamed token by token, not in one piece
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == MAX_TOKENS


def test_stream_frames_are_sse_data_lines_ending_in_done(server: Server) -> None:
    response = httpx.post(
        f"{server.base_url}/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": MODEL, "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True},
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.endswith("\n\ndata: [DONE]\n\n")
    *frames, done = response.text.removesuffix("\n\n").split("\n\n")
    assert done == "data: [DONE]"
    chunks = [json.loads(frame.removeprefix("data: ")) for frame in frames]
    assert set(chunks[0]) == {"id", "object", "created", "model", "system_fingerprint", "choices"}
    assert chunks[0]["choices"][0].keys() == {"index", "text", "logprobs", "finish_reason"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_completion_stop_sequence_cuts_the_text(server: Server, engine_greedy) -> None:
    stop = engine_greedy.text[8:12]
    result = server.client().completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stop=[stop]
    )
    assert result.choices[0].text == engine_greedy.text[: engine_greedy.text.index(stop)]
    assert result.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(server: Server) -> None:
    def sample() -> str:
        return (
            server.client()
            .completions.create(
                model=MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0, top_p=0.9, seed=7
            )
            .choices[0]
            .text
        )

    assert sample() == sample()


def test_chat_stream_uses_the_template(server: Server, demo_dir: Path) -> None:
    messages = [
        {"role": "system", "content": "You answer questions about Python."},
        {"role": "user", "content": "What does the for statement do?"},
    ]
    client = server.client()
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=20, temperature=0, stream=True
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in {"stop", "length"}
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)

    whole = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=20, temperature=0
    )
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == streamed
    assert CHAT_TURN_STOP not in streamed

    from inference_demo.llama.tokenizer import Tokenizer

    prompt = chat_prompt(messages)
    assert prompt == (
        "You answer questions about Python.\n\nUser: What does the for statement do?\nAssistant:"
    )
    ids = Tokenizer(demo_dir / "tokenizer.model").encode(prompt, bos=True, eos=False)
    assert whole.usage.prompt_tokens == len(ids)


def test_wrong_api_key_is_refused(server: Server) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        server.client(api_key="sk-wrong").models.list()
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"


@pytest.mark.parametrize(
    ("params", "param", "message"),
    [
        ({"temperature": 5}, "temperature", "temperature must be a number between 0 and 2"),
        ({"top_p": 0}, "top_p", "top_p must be a number in (0, 1]"),
        ({"max_tokens": 0}, "max_tokens", "max_tokens must be an integer of at least 1"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "stop takes at most 4 sequences"),
        ({"n": 2}, "n", "n is not supported by this server"),
        ({"extra_body": {"bogus": 1}}, "bogus", "Unrecognized request argument supplied: bogus"),
    ],
)
def test_bad_params_are_a_400_naming_the_param(
    server: Server, params: dict[str, Any], param: str, message: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().completions.create(model=MODEL, prompt=PROMPT, **params)
    assert caught.value.param == param
    assert message in caught.value.message
    assert caught.value.body["type"] == "invalid_request_error"


def test_prompt_beyond_the_context_is_a_400(server: Server) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().completions.create(model=MODEL, prompt="for x in y: " * 600)
    assert caught.value.code == "context_length_exceeded"
    assert caught.value.param == "prompt"


def test_unknown_model_is_a_404(server: Server) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        server.client().completions.create(model="gpt-4o", prompt=PROMPT)
    assert caught.value.code == "model_not_found"
    assert "The model 'gpt-4o' does not exist" in caught.value.message
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("gpt-4o")


def test_unknown_path_wrong_method_and_large_body(server: Server) -> None:
    client = server.client()
    with pytest.raises(openai.NotFoundError) as caught:
        client.get("/embeddings", cast_to=object)
    assert caught.value.code == "unknown_url"
    with pytest.raises(openai.APIStatusError) as caught:
        client.get("/completions", cast_to=object)
    assert caught.value.status_code == 405
    assert caught.value.response.headers["Allow"] == "POST"
    with pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(model=MODEL, prompt="x" * (1 << 20))
    assert caught.value.status_code == 413
    assert caught.value.code == "request_too_large"
    assert client.models.list().data[0].id == MODEL  # the server is still fine


def _raw_stream_request(base_url: str, body: dict[str, Any]) -> socket.socket:
    host, port = re.match(r"http://([^:]+):(\d+)/v1", base_url).groups()
    sock = socket.create_connection((host, int(port)), timeout=30)
    data = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_the_request(server: Server, stream: bool) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 900, "temperature": 0, "stream": stream}
    before = set(server.log_lines())
    sock = _raw_stream_request(server.base_url, body)
    if stream:
        received = b""
        while b"data: {" not in received:
            received += sock.recv(4096)
    else:
        time.sleep(0.3)  # generating, nothing sent yet
    sock.close()

    deadline = time.monotonic() + 30
    while not (
        ended := [
            line for line in server.log_lines() if "completion:" in line and line not in before
        ]
    ):
        assert time.monotonic() < deadline, "the server never logged the request's end"
        time.sleep(0.05)
    [line] = ended
    assert "finish_reason=cancelled" in line and "(client disconnected)" in line
    tokens = int(re.search(r"completion_tokens=(\d+)", line).group(1))
    assert tokens < 900


def test_concurrent_requests_each_get_the_greedy_text(server: Server, engine_greedy) -> None:
    client = server.client()
    texts: list[str] = []

    def complete() -> None:
        result = client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0
        )
        texts.append(result.choices[0].text)

    threads = [threading.Thread(target=complete) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert texts == [engine_greedy.text] * 4


class StoppedEngine:
    is_running = False
    max_seq_len = 1024


class FailingRequest:
    id = 1
    completion = None

    def __init__(self) -> None:
        self.deltas = iter(["partial"])

    def __iter__(self) -> FailingRequest:
        return self

    def __next__(self) -> str:
        for delta in self.deltas:
            return delta
        raise RuntimeError("decode step failed")

    def result(self) -> None:
        for _ in self:
            pass

    def cancel(self) -> None:
        pass


class FailingEngine(StoppedEngine):
    is_running = True

    def submit(self, prompt: str, params: Any) -> FailingRequest:
        return FailingRequest()


@pytest.fixture
def stub_server() -> Iterator[Any]:
    state = ServerState(StoppedEngine(), MODEL, None, 0)
    server = make_server(state, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="x", max_retries=0)
    try:
        yield state, client
    finally:
        server.shutdown()
        server.server_close()


def test_a_stopped_engine_is_a_503(stub_server) -> None:
    _, client = stub_server
    with pytest.raises(openai.InternalServerError) as caught:
        client.completions.create(model=MODEL, prompt=PROMPT)
    assert caught.value.status_code == 503
    assert caught.value.code == "engine_stopped"


def test_a_failure_mid_stream_arrives_as_an_error_event(stub_server) -> None:
    state, client = stub_server
    state.engine = FailingEngine()
    stream = client.completions.create(model=MODEL, prompt=PROMPT, stream=True)
    assert next(stream).choices[0].text == "partial"
    with pytest.raises(openai.APIError, match="decode step failed"):
        next(stream)
    raw = httpx.post(
        f"{client.base_url}completions", json={"model": MODEL, "prompt": PROMPT, "stream": True}
    )
    *_, last = raw.text.strip().split("\n\n")
    assert json.loads(last.removeprefix("data: "))["error"]["code"] == "model_error"
    assert "[DONE]" not in raw.text
    with pytest.raises(openai.InternalServerError) as caught:
        client.completions.create(model=MODEL, prompt=PROMPT)
    assert caught.value.status_code == 500
    assert caught.value.code == "model_error"


@pytest.mark.parametrize(
    ("messages", "param", "message"),
    [
        ([], "messages", "messages must be a non-empty list"),
        ([{"role": "tool", "content": "x"}], "messages.[0].role", "unsupported role 'tool'"),
        ([{"role": "system", "content": "x"}], "messages", "at least one user message"),
        (
            [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}],
            "messages.[1].role",
            "system messages must come before the conversation",
        ),
    ],
)
def test_bad_chat_messages_are_a_400(
    server: Server, messages: list[dict[str, Any]], param: str, message: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().chat.completions.create(model=MODEL, messages=messages)
    assert caught.value.param == param
    assert message in caught.value.message
