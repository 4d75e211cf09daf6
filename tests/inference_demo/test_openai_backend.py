"""A demo release answered by an OpenAI-compatible server: the project's own, over HTTP.

The same runner, transport, page, quotas and records as the built-in engine; only
``DEMO_OPENAI_BACKENDS`` differs. The server is ``python -m inference_demo.serve`` on the
bundled demo model, a real process on a loopback port.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from inference_demo import runner, runtime, transport
from inference_demo.backend_config import OpenAIBackendConfig, parse_openai_backends
from inference_demo.models import DemoRequest
from inference_demo.services import QUOTA
from tests.inference_demo.serve_process import Server, serve_process
from tests.inference_demo.test_runner import kinds, make_request, text_of, wait_until
from tests.inference_demo.test_views import (  # noqa: F401 (fixtures)
    BODY,
    DEMO,
    GENERATE,
    PAGE,
    demo_release,
    embedded,
    grantee,
    limits,
    read_events,
)
from tests.inference_demo.test_worker import demo_worker, services_mode  # noqa: F401 (fixtures)

# ruff: noqa: F811  (the fixtures imported from test_views are parameters here)

API_KEY = "sk-backend-test"
REMOTE_MODEL = "remote-llama"
PROMPT = "The for statement"


@pytest.fixture(scope="module")
def server(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("backend") / "server.log"
    with serve_process(demo_dir, log, model_name=REMOTE_MODEL, api_key=API_KEY) as running:
        yield running


@pytest.fixture(scope="module")
def builtin_greedy(demo_dir: Path):
    """The built-in engine's greedy completion of PROMPT: what the server must also give."""
    from inference_demo.llama.engine import open_engine
    from inference_demo.llama.generation import SamplingParams

    engine = open_engine(demo_dir, max_batch_size=1, max_seq_len=1024)
    try:
        return engine.submit(PROMPT, SamplingParams(max_new_tokens=24)).result()
    finally:
        engine.stop()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket closes


@pytest.fixture
def backend(server: Server, embedded) -> Iterator[OpenAIBackendConfig]:
    config = OpenAIBackendConfig(DEMO, server.base_url, REMOTE_MODEL, API_KEY)
    runtime.reset()
    with override_settings(DEMO_OPENAI_BACKENDS={DEMO: config}):
        yield config
        runtime.reset()


def use_backend(**changes) -> override_settings:
    values = {"base_url": "", "model": REMOTE_MODEL, "api_key": API_KEY, **changes}
    return override_settings(DEMO_OPENAI_BACKENDS={DEMO: OpenAIBackendConfig(DEMO, **values)})


# --- the runner over HTTP ------------------------------------------------------------------


@pytest.mark.django_db
def test_greedy_stream_equals_the_builtin_engine_and_is_recorded(backend, builtin_greedy):
    row = make_request(PROMPT, max_new_tokens=24)
    events = list(runner.run(row.pk))

    assert kinds(events)[:2] == ["queued", "started"]
    assert len([e for e in events if e["event"] == "delta"]) >= 2  # streamed, not one block
    assert text_of(events) == builtin_greedy.text  # same weights, same greedy tokens
    done = events[-1]
    assert done["event"] == "done" and done["finish_reason"] == builtin_greedy.finish_reason
    assert done["tokens_out"] == len(builtin_greedy.token_ids)
    assert done["tokens_in"] == builtin_greedy.timings.prompt_tokens  # the server's usage
    row.refresh_from_db()
    assert (row.status, row.finish_reason) == ("done", builtin_greedy.finish_reason)
    assert (row.tokens_in, row.tokens_out) == (done["tokens_in"], done["tokens_out"])
    assert row.ttft_ms is not None and row.duration_ms >= row.ttft_ms


@pytest.mark.django_db
def test_stop_sequences_reach_the_server(backend, builtin_greedy):
    text = builtin_greedy.text
    stop = text.strip()[len(text.strip()) // 2 :][:3]
    row = make_request(PROMPT, max_new_tokens=24, stop=[stop])
    events = list(runner.run(row.pk))
    assert text_of(events) == text[: text.index(stop)]
    assert events[-1]["finish_reason"] == "stop"


@pytest.mark.django_db
def test_builtin_engine_is_never_loaded_for_a_backend_slug(backend):
    engine = runtime.get_engine(DEMO)
    assert type(engine).__name__ == "OpenAIBackend"
    assert runtime.model_dir(DEMO) is None  # the local weights are not this demo's source
    assert transport.demo_available(DEMO) is True
    assert runtime.available_slugs() == [DEMO]


@pytest.mark.django_db
def test_stop_mid_stream_ends_the_remote_generation(backend, server):
    row = make_request(PROMPT, max_new_tokens=200, temperature=0.8, top_p=0.9, seed=1)
    events: list[dict] = []
    for event in transport.stream_request(row):
        events.append(event)
        if event["event"] == "delta" and len(events) < 100:
            transport.cancel_request(row.pk)  # the Stop button, while text streams

    assert events[-1] == {"event": "error", "code": "cancelled", "message": runner.MSG_CANCELLED}
    row.refresh_from_db()
    assert (row.status, row.finish_reason) == ("cancelled", "cancelled")
    assert 0 < row.tokens_out < 200
    # The server saw its client go and stopped well before 200 tokens.
    wait_until(lambda: "(client disconnected)" in server.log.read_text(), timeout=15)
    line = next(ln for ln in server.log_lines() if "(client disconnected)" in ln)
    generated = int(line.split("completion_tokens=")[1].split()[0])
    assert generated < 200, line


@pytest.mark.django_db
def test_a_closed_reader_cancels_like_stop(backend):
    row = make_request(PROMPT, max_new_tokens=200)
    stream = transport.stream_request(row)
    assert next(e for e in stream if e["event"] == "delta")
    stream.close()  # the browser went away
    row.refresh_from_db()
    assert row.status == "cancelled" and row.tokens_out < 200


@pytest.mark.django_db
def test_a_server_that_is_down_makes_the_demo_unavailable(embedded):
    runtime.reset()
    with use_backend(base_url=f"http://127.0.0.1:{closed_port()}/v1"):
        assert transport.demo_available(DEMO) is False
        row = make_request(PROMPT)
        started = time.monotonic()
        events = list(runner.run(row.pk))
        assert time.monotonic() - started < 10
    runtime.reset()
    assert events == [{"event": "error", "code": "unavailable", "message": runner.MSG_UNAVAILABLE}]
    row.refresh_from_db()
    assert row.status == "failed" and row.error.startswith(
        "unavailable: ModelUnavailable: http://127.0.0.1:"
    )


@pytest.mark.django_db
def test_a_wrong_key_or_model_is_unavailable_not_a_crash(server, embedded):
    for changes in ({"api_key": "sk-wrong"}, {"model": "no-such-model"}):
        runtime.reset()
        with use_backend(base_url=server.base_url, **changes):
            row = make_request(PROMPT)
            events = list(runner.run(row.pk))
            row.refresh_from_db()
        assert events[-1]["code"] == "unavailable", (changes, events)
        assert row.status == "failed"
    runtime.reset()


@pytest.mark.django_db
def test_a_prompt_over_the_servers_context_is_refused_precisely(backend):
    long_prompt = " ".join(["word"] * 1500)  # over the server's 1024-token context
    row = make_request(long_prompt, max_new_tokens=8)
    events = list(runner.run(row.pk))
    assert events[-1]["event"] == "error" and events[-1]["code"] == "prompt_too_long"
    assert "1024" in events[-1]["message"]
    row.refresh_from_db()
    assert row.status == "failed" and row.error.startswith("prompt_too_long:")


# --- the page and its rules, unchanged ------------------------------------------------------


@pytest.mark.django_db
def test_the_demo_page_streams_from_the_backend(client, grantee, backend):
    client.force_login(grantee)
    assert 'id="demo-unavailable" class="notice" role="alert" hidden' in (
        client.get(PAGE).content.decode()
    )
    events = read_events(client.post(GENERATE, {**BODY, "prompt": PROMPT, "max_new_tokens": 12}))
    names = [name for name, _ in events]
    assert names[0] == "request" and names[-1] == "done", events
    assert "".join(data["text"] for name, data in events if name == "delta")
    row = DemoRequest.objects.get()
    assert (row.user, row.status, row.tokens_out) == (grantee, "done", events[-1][1]["tokens_out"])


@pytest.mark.django_db
def test_quota_is_the_same_and_refused_before_the_server_is_asked(client, grantee, embedded):
    runtime.reset()
    down = f"http://127.0.0.1:{closed_port()}/v1"
    with use_backend(base_url=down), override_settings(DEMO_LIMITS=limits(daily_tokens=10)):
        client.force_login(grantee)
        response = client.post(GENERATE, {**BODY, "max_new_tokens": 11})
    runtime.reset()
    assert response.status_code == 429
    assert response.json()["detail"] == QUOTA.format(quota=10, left=10, asked=11)
    assert not DemoRequest.objects.exists()


@pytest.mark.django_db
def test_the_page_says_unavailable_when_the_server_is_down(client, grantee, embedded):
    runtime.reset()
    with use_backend(base_url=f"http://127.0.0.1:{closed_port()}/v1"):
        client.force_login(grantee)
        page = client.get(PAGE).content.decode()
    runtime.reset()
    assert 'id="demo-unavailable" class="notice" role="alert">The demo is unavailable' in page


# --- configuration ----------------------------------------------------------------------------


def test_backends_parse_from_json():
    parsed = parse_openai_backends(
        '{"llama-65b": {"base_url": "http://vllm:8000/v1/", "model": "llama-65b", '
        '"api_key": "sk-secret", "timeout_s": 30}}'
    )
    config = parsed["llama-65b"]
    assert (config.base_url, config.model, config.api_key, config.timeout_s) == (
        "http://vllm:8000/v1",
        "llama-65b",
        "sk-secret",
        30.0,
    )
    assert "sk-secret" not in repr(parsed)  # settings end up in logs and error pages
    assert parse_openai_backends("  ") == {}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("{not json", "not valid JSON"),
        ('["x"]', "must be a JSON object"),
        ('{"bad slug!": {}}', "is not a release slug"),
        ('{"a": "http://x/v1"}', "must be an object with base_url and model"),
        ('{"a": {"base_url": "ftp://x/v1", "model": "m"}}', "must be an http(s) URL"),
        ('{"a": {"base_url": "http:///v1", "model": "m"}}', "has no host"),
        ('{"a": {"base_url": "http://x/v1"}}', "model of a must be"),
        ('{"a": {"base_url": "http://x/v1", "model": "m", "key": "k"}}', "unknown key 'key'"),
        ('{"a": {"base_url": "http://x/v1", "model": "m", "timeout_s": 0}}', "timeout_s of a"),
    ],
)
def test_a_bad_backend_setting_is_refused_precisely(raw, message):
    with pytest.raises(ImproperlyConfigured) as refused:
        parse_openai_backends(raw)
    assert str(refused.value).startswith("DEMO_OPENAI_BACKENDS: ")
    assert message in str(refused.value)


# --- services mode: the demo worker relays ---------------------------------------------------


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_in_services_mode_the_demo_worker_relays_the_backend(server, builtin_greedy, demo_worker):
    served_before = server.log.read_text().count("finish_reason=")
    with use_backend(base_url=server.base_url):
        runtime.reset()
        row = make_request(PROMPT, max_new_tokens=24)
        events = list(transport.stream_request(row))
        relayed_by = type(runtime._engines.get(DEMO)).__name__  # the worker thread's runtime
    runtime.reset()

    assert kinds(events)[0] == "queued" and events[-1]["event"] == "done", events
    assert text_of(events) == builtin_greedy.text
    assert relayed_by == "OpenAIBackend"
    wait_until(lambda: server.log.read_text().count("finish_reason=") == served_before + 1)
    row.refresh_from_db()
    assert (row.status, row.tokens_out) == ("done", len(builtin_greedy.token_ids))
