"""The OpenAI wire format for ``inference_demo.serve``: request validation, response bodies.

Pure functions over JSON-like dicts, no torch and no I/O, so every rule here is tested
without a model. ``parse_completion`` and ``parse_chat`` turn a request body into a
``Job`` or raise ``ApiError``; the ``*_body`` and ``*_chunk`` functions build responses
field for field as OpenAI's API returns them.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_STOPS = 4  # as OpenAI: at most four stop sequences
TEMPERATURE_MAX = 2.0
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

# The chat template of this base model (documented in docs/openai_server.md).
CHAT_ROLES = {"system": "", "developer": "", "user": "User", "assistant": "Assistant"}
CHAT_TURN_STOP = "\nUser:"

# Accepted and ignored: they change nothing about the generated text.
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "stream_options"}
# Accepted only at the value that means "off".
UNSUPPORTED_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "echo": (None, False),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
}
SAMPLING = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream"}
COMPLETION_FIELDS = SAMPLING | {"prompt"} | IGNORED | set(UNSUPPORTED_DEFAULTS)
CHAT_FIELDS = SAMPLING | {"messages", "max_completion_tokens"} | IGNORED | set(UNSUPPORTED_DEFAULTS)


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def model_not_found(name: str) -> ApiError:
    return ApiError(
        404,
        f"The model '{name}' does not exist",
        param="model",
        code="model_not_found",
    )


@dataclass(frozen=True)
class Job:
    """A validated generation request, independent of the endpoint it came from."""

    kind: str  # "completion" or "chat"
    model: str
    prompt: str
    max_tokens: int
    temperature: float
    top_p: float | None
    top_k: int | None
    seed: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool = False
    id: str = field(default="")
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def prompt_param(self) -> str:
        return "prompt" if self.kind == "completion" else "messages"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_fields(body: Mapping[str, Any], allowed: set[str]) -> None:
    for name in body:
        if name not in allowed:
            raise bad_request(f"Unrecognized request argument supplied: {name}", param=name)
    for name, allowed_values in UNSUPPORTED_DEFAULTS.items():
        if name in body and body[name] not in allowed_values:
            raise bad_request(
                f"{name} is not supported by this server", param=name, code="unsupported_parameter"
            )


def _max_tokens(body: Mapping[str, Any], name: str, default: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value) or value < 1:
        raise bad_request(f"{name} must be an integer of at least 1, got {value!r}", param=name)
    return value


def _stops(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request("stop must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOPS:
        raise bad_request(f"stop takes at most {MAX_STOPS} sequences", param="stop")
    if any(not s for s in stops):
        raise bad_request("stop sequences must not be empty", param="stop")
    return tuple(stops)


def _common(body: Any, allowed: set[str], kind: str, served_model: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("you must provide a model parameter", param="model")
    if model != served_model:
        raise model_not_found(model)
    _check_fields(body, allowed)
    temperature = body.get("temperature", 1.0)
    if temperature is None:
        temperature = 1.0
    if not _is_number(temperature) or not 0 <= temperature <= TEMPERATURE_MAX:
        raise bad_request(
            f"temperature must be a number between 0 and {TEMPERATURE_MAX:g}, got {temperature!r}",
            param="temperature",
        )
    top_p = body.get("top_p")
    if top_p is not None and (not _is_number(top_p) or not 0 < top_p <= 1):
        raise bad_request(f"top_p must be a number in (0, 1], got {top_p!r}", param="top_p")
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise bad_request(f"top_k must be an integer of at least 1, got {top_k!r}", param="top_k")
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbits(63)  # no seed: a fresh draw each time, as OpenAI
    elif not _is_int(seed) or not SEED_MIN <= seed <= SEED_MAX:
        raise bad_request(f"seed must be a 64-bit integer, got {seed!r}", param="seed")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("stream must be a boolean", param="stream")
    options = body.get("stream_options")
    if options is not None and not (stream and isinstance(options, dict)):
        raise bad_request("stream_options is only allowed with stream=true", param="stream_options")
    prefix = "cmpl" if kind == "completion" else "chatcmpl"
    return {
        "kind": kind,
        "model": model,
        "temperature": float(temperature),
        "top_p": None if top_p is None else float(top_p),
        "top_k": top_k,
        "seed": seed,
        "stop": _stops(body.get("stop")),
        "stream": stream,
        "include_usage": bool((options or {}).get("include_usage")),
        "id": f"{prefix}-{uuid.uuid4().hex}",
    }


def parse_completion(body: Any, served_model: str) -> Job:
    common = _common(body, COMPLETION_FIELDS, "completion", served_model)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad_request("prompt must be a string (or a list of one string)", param="prompt")
    if not prompt:
        raise bad_request("prompt must not be empty", param="prompt")
    max_tokens = _max_tokens(body, "max_tokens", DEFAULT_COMPLETION_MAX_TOKENS)
    return Job(prompt=prompt, max_tokens=max_tokens, **common)


def _content_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"):
                raise bad_request(
                    "only text content parts are supported", param=f"messages.[{index}].content"
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise bad_request("a text part needs a text string", param=f"messages.[{index}]")
            parts.append(text)
        return "".join(parts)
    raise bad_request("message content must be a string", param=f"messages.[{index}].content")


def chat_prompt(messages: Any) -> str:
    """The prompt for ``messages``: system text, then ``User:``/``Assistant:`` turns."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", param="messages")
    system: list[str] = []
    turns: list[str] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request("each message must be an object", param=f"messages.[{index}]")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise bad_request(
                f"unsupported role {role!r}: use system, developer, user or assistant",
                param=f"messages.[{index}].role",
            )
        text = _content_text(message.get("content"), index).strip()
        if not CHAT_ROLES[role]:
            if turns:
                raise bad_request(
                    "system messages must come before the conversation",
                    param=f"messages.[{index}].role",
                )
            system.append(text)
        else:
            turns.append(f"{CHAT_ROLES[role]}: {text}")
    if not turns:
        raise bad_request("messages need at least one user message", param="messages")
    head = "\n".join(system) + "\n\n" if system else ""
    return head + "\n".join(turns) + "\nAssistant:"


def parse_chat(body: Any, served_model: str, context_len: int) -> Job:
    common = _common(body, CHAT_FIELDS, "chat", served_model)
    prompt = chat_prompt(body.get("messages"))
    name = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    max_tokens = _max_tokens(body, name, context_len)  # no limit: the rest of the context
    common["stop"] = (*common["stop"], CHAT_TURN_STOP)  # the model would go on playing the user
    return Job(prompt=prompt, max_tokens=max_tokens, **common)


# Responses.


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def model_object(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "inference_demo"}


def models_body(name: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_object(name, created)]}


def _envelope(job: Job, obj: str) -> dict[str, Any]:
    return {
        "id": job.id,
        "object": obj,
        "created": job.created,
        "model": job.model,
        "system_fingerprint": None,
    }


def response_body(
    job: Job, text: str, finish_reason: str, counts: dict[str, int]
) -> dict[str, Any]:
    """The non-streaming answer of either endpoint."""
    if job.kind == "completion":
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        body = _envelope(job, "text_completion")
    else:
        message = {"role": "assistant", "content": text, "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        body = _envelope(job, "chat.completion")
    return {**body, "choices": [choice], "usage": counts}


def chunk(job: Job, text: str | None, finish_reason: str | None = None) -> dict[str, Any]:
    """One streamed chunk; for chat, ``text=None`` opens the message with its role."""
    if job.kind == "completion":
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        body = _envelope(job, "text_completion")
    else:
        if finish_reason is not None:
            delta: dict[str, Any] = {}
        elif text is None:
            delta = {"role": "assistant", "content": ""}
        else:
            delta = {"content": text}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        body = _envelope(job, "chat.completion.chunk")
    if job.include_usage:
        body["usage"] = None
    return {**body, "choices": [choice]}


def usage_chunk(job: Job, counts: dict[str, int]) -> dict[str, Any]:
    """The last chunk when ``stream_options.include_usage`` is set: no choices, the usage."""
    obj = "text_completion" if job.kind == "completion" else "chat.completion.chunk"
    return {**_envelope(job, obj), "choices": [], "usage": counts}
