"""A demo release answered by an OpenAI-compatible server instead of the built-in engine.

The way to run 13B-65B on vLLM, TGI or llama.cpp's server across GPUs. For a slug in
``settings.DEMO_OPENAI_BACKENDS``, ``runtime.get_engine`` returns an ``OpenAIBackend``,
which offers what ``runner`` uses of the built-in ``Engine``: ``submit(prompt, params)``
returns a request to iterate for text deltas, with ``cancel()``, ``queue_position`` and,
at the end, ``completion`` (finish reason and timings). Queueing, cancelling, quotas,
records and "unavailable" therefore take the same code path for both backends.

Each request is one streamed ``POST {base_url}/completions`` with
``stream_options.include_usage``, so the record holds the server's own token counts.
Cancelling closes the HTTP response: vLLM, TGI, llama.cpp and ``inference_demo.serve``
all abort a generation whose client went away, which frees its slot there.

No torch here: in embedded mode with only OpenAI backends the web process never loads it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai

from inference_demo.backend_config import OpenAIBackendConfig
from inference_demo.runtime import ModelUnavailable

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 3.0
PROBE_TIMEOUT_S = 2.0
PROBE_EVERY_S = 5.0  # the page and the worker heartbeat ask at most this often
FINISH_REASONS = {"stop": "stop", "length": "length"}  # anything else ends as "stop"


class BackendBusy(Exception):
    """The server answered 429 or 503: it is full, try again shortly."""


class BackendRefused(Exception):
    """The server refused this request (a 4xx other than auth, model or busy)."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code

    @property
    def context_exceeded(self) -> bool:
        # OpenAI's and ours say so in the code; vLLM and TGI only in the message.
        return "context" in self.code or "context" in str(self).lower()


class BackendFailed(Exception):
    """The server failed while generating."""


@dataclass
class BackendTimings:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    queued_s: float = 0.0
    ttft_s: float = 0.0
    total_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """Decode rate after the first token, as the built-in engine reports it."""
        decode_s = self.total_s - self.ttft_s
        return max(self.generated_tokens - 1, 0) / decode_s if decode_s > 0 else 0.0


@dataclass
class BackendCompletion:
    text: str
    finish_reason: str  # "stop", "length" or "cancelled"
    timings: BackendTimings = field(default_factory=BackendTimings)


def _status_error(exc: openai.APIStatusError, config: OpenAIBackendConfig) -> Exception:
    detail = _message(exc)
    if exc.status_code in (429, 503):
        return BackendBusy(f"{config.base_url} is busy: {detail}")
    if exc.status_code in (401, 403, 404):  # misconfigured: wrong key or model name
        log.error("demo backend %s refused the portal: %s %s", config.slug, exc.status_code, detail)
        return ModelUnavailable(f"{config.base_url} answered {exc.status_code}: {detail}")
    if 400 <= exc.status_code < 500:
        code = exc.code if isinstance(exc.code, str) else ""
        return BackendRefused(detail, code)
    return BackendFailed(f"{config.base_url} answered {exc.status_code}: {detail}")


def _message(exc: openai.APIError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"]
        if isinstance(body.get("message"), str):
            return body["message"]
    return exc.message


class OpenAIBackend:
    """One configured server; safe to share between threads (the client is)."""

    def __init__(self, config: OpenAIBackendConfig) -> None:
        self.config = config
        self.client = openai.OpenAI(
            base_url=config.base_url,
            api_key=config.api_key or "none",  # the client insists on one; servers ignore it
            max_retries=0,  # the demo answers "busy" or "unavailable" instead
            timeout=httpx.Timeout(config.timeout_s, connect=CONNECT_TIMEOUT_S),
        )
        self._ids = itertools.count(1)
        self._probe_lock = threading.Lock()
        self._probed_at = float("-inf")
        self._reachable = False

    @property
    def is_running(self) -> bool:
        return True  # a failure concerns one request; there is no local state to reload

    def stop(self, timeout: float | None = None) -> None:
        self.client.close()

    def reachable(self) -> bool:
        """Whether the server lists its models, asked at most every PROBE_EVERY_S."""
        with self._probe_lock:
            if time.monotonic() - self._probed_at < PROBE_EVERY_S:
                return self._reachable
            try:
                self.client.with_options(timeout=PROBE_TIMEOUT_S).models.list()
                self._reachable = True
            except openai.APIError as exc:
                log.warning("demo backend %s unreachable: %s", self.config.slug, exc)
                self._reachable = False
            self._probed_at = time.monotonic()
            return self._reachable

    def submit(self, prompt: str, params: Any) -> BackendRequest:
        """Start one streamed completion; raises at once when the server cannot take it."""
        started = time.perf_counter()
        for attempt in range(2):
            try:
                return self._submit(prompt, params, started)
            except openai.APIConnectionError as exc:
                # A kept-alive connection the server dropped (llama.cpp after a refused
                # request) is worth one retry; a server that is down refuses the connect.
                dropped = isinstance(exc.__cause__, httpx.ReadError | httpx.RemoteProtocolError)
                if attempt or not dropped:
                    self._probed_at, self._reachable = time.monotonic(), False
                    raise ModelUnavailable(f"{self.config.base_url}: {exc}") from None
        raise AssertionError("unreachable")

    def _submit(self, prompt: str, params: Any, started: float) -> BackendRequest:
        try:
            stream = self.client.completions.create(
                model=self.config.model,
                prompt=prompt,
                max_tokens=params.max_new_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                seed=params.seed,
                stop=list(params.stop) or None,
                stream=True,
                stream_options={"include_usage": True},
            )
        except openai.APIStatusError as exc:
            raise _status_error(exc, self.config) from None
        return BackendRequest(next(self._ids), self.config, stream, started)


class BackendRequest(Iterator[str]):
    """One streamed completion: iterate for text deltas, then read ``completion``."""

    queue_position = 0  # the server queues on its side; to us it runs from submit on

    def __init__(self, rid: int, config: OpenAIBackendConfig, stream: Any, started: float) -> None:
        self.id = rid
        self.config = config
        self._stream = stream
        self._chunks = iter(stream)
        self._started = started
        self._text: list[str] = []
        self._usage: Any = None
        self._finish: str | None = None
        self._first_at: float | None = None
        self._deltas = 0
        self.cancelled = threading.Event()
        self.completion: BackendCompletion | None = None

    def cancel(self) -> None:
        """Close the response; the server stops generating, the iterator ends cancelled."""
        self.cancelled.set()
        try:
            self._stream.response.close()
        except Exception:  # closing a response another thread reads may race; the flag holds
            log.debug("closing the stream of backend request %s", self.id, exc_info=True)

    def __next__(self) -> str:
        while self.completion is None:
            if self.cancelled.is_set():
                self._end("cancelled")
                break
            try:
                chunk = next(self._chunks)
            except StopIteration:
                if self._finish is None and not self.cancelled.is_set():
                    # The server gave up without saying why (llama-cpp-python does this,
                    # streamed, for a prompt over its context).
                    raise BackendFailed(
                        f"{self.config.base_url}: the stream ended without a finish_reason"
                    ) from None
                self._end(self._finish or "cancelled")
                break
            except (openai.APIError, httpx.HTTPError, OSError) as exc:
                if self.cancelled.is_set():
                    self._end("cancelled")
                    break
                if isinstance(exc, openai.APIStatusError):
                    raise _status_error(exc, self.config) from None
                raise BackendFailed(f"{self.config.base_url}: {exc}") from None
            text = self._take(chunk)
            if text:
                return text
        raise StopIteration

    def _take(self, chunk: Any) -> str:
        if getattr(chunk, "usage", None) is not None:
            self._usage = chunk.usage
        text = ""
        for choice in chunk.choices or ():
            text += choice.text or ""
            if choice.finish_reason:
                self._finish = FINISH_REASONS.get(choice.finish_reason, "stop")
        if text:
            self._deltas += 1
            if self._first_at is None:
                self._first_at = time.perf_counter()
            self._text.append(text)
        return text

    def _end(self, reason: str) -> None:
        now = time.perf_counter()
        usage = self._usage
        timings = BackendTimings(
            prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
            # Without usage (a server that ignores include_usage), a delta is about a token.
            generated_tokens=getattr(usage, "completion_tokens", None) or self._deltas,
            ttft_s=(self._first_at - self._started) if self._first_at is not None else 0.0,
            total_s=now - self._started,
        )
        self.completion = BackendCompletion("".join(self._text), reason, timings)
        try:
            self._stream.close()
        except Exception:
            log.debug("closing the stream of backend request %s", self.id, exc_info=True)
