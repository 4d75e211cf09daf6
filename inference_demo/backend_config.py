"""Which demo releases an OpenAI-compatible server answers, read from the environment.

``DEMO_OPENAI_BACKENDS`` is a JSON object, one entry per release slug::

    {"llama-65b": {"base_url": "http://vllm.internal:8000/v1", "model": "llama-65b",
                   "api_key": "...", "timeout_s": 60}}

``base_url`` (http or https, up to and including ``/v1``) and ``model`` (the name the
server knows the weights by) are required; ``api_key`` and ``timeout_s`` (the longest
silence while a response streams) are optional. An entry overrides ``DEMO_MODELS`` for
its slug. settings.py calls this module: no torch, nothing that needs Django set up.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from django.core.exceptions import ImproperlyConfigured

SETTING = "DEMO_OPENAI_BACKENDS"
SLUG = re.compile(r"^[-a-zA-Z0-9_]+\Z")
KEYS = {"base_url", "model", "api_key", "timeout_s"}
DEFAULT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class OpenAIBackendConfig:
    slug: str
    base_url: str
    model: str
    api_key: str = ""
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __repr__(self) -> str:  # never the key: settings and configs end up in logs
        key = ", api_key=<set>" if self.api_key else ""
        return f"OpenAIBackendConfig({self.slug!r}, {self.base_url!r}, {self.model!r}{key})"


def _refuse(message: str) -> ImproperlyConfigured:
    return ImproperlyConfigured(f"{SETTING}: {message}")


def _entry(slug: str, entry: object) -> OpenAIBackendConfig:
    if not isinstance(slug, str) or not SLUG.match(slug):
        raise _refuse(f"{slug!r} is not a release slug (letters, digits, '-' and '_')")
    if not isinstance(entry, dict):
        raise _refuse(f"the entry for {slug} must be an object with base_url and model")
    unknown = sorted(set(entry) - KEYS)
    if unknown:
        raise _refuse(
            f"unknown key {unknown[0]!r} for {slug}; the keys are {', '.join(sorted(KEYS))}"
        )
    base_url, model = entry.get("base_url"), entry.get("model")
    if not isinstance(base_url, str) or urlsplit(base_url).scheme not in ("http", "https"):
        raise _refuse(f"base_url of {slug} must be an http(s) URL, such as http://host:8000/v1")
    if not urlsplit(base_url).netloc:
        raise _refuse(f"base_url of {slug} has no host")
    if not isinstance(model, str) or not model.strip():
        raise _refuse(f"model of {slug} must be the model name the server serves")
    api_key = entry.get("api_key", "")
    if not isinstance(api_key, str):
        raise _refuse(f"api_key of {slug} must be a string")
    timeout = entry.get("timeout_s", DEFAULT_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise _refuse(f"timeout_s of {slug} must be a positive number of seconds")
    return OpenAIBackendConfig(slug, base_url.rstrip("/"), model.strip(), api_key, float(timeout))


def parse_openai_backends(raw: str) -> dict[str, OpenAIBackendConfig]:
    """The backends an environment value names; an empty value names none."""
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _refuse(f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise _refuse('must be a JSON object: {"<release slug>": {"base_url": ..., "model": ...}}')
    return {slug: _entry(slug, entry) for slug, entry in data.items()}
