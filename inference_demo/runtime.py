"""One engine per demo model per process: loaded on first use, shared by every thread.

This is the only module of the serving path that touches torch, and only inside
functions: the web process imports ``transport``, ``runner`` and ``tasks``, which
import this module, and must never import torch (DESIGN decision 6). In embedded
mode the web process loads the engine here on the first demo request; in services
mode only the demo worker does.

Engine sizing comes from ``settings.DEMO_ENGINE`` (optional), a dict with
``max_batch_size`` (concurrent sequences in one decode step), ``max_queue``
(requests that may wait for a slot before ``submit`` answers "busy") and
``max_seq_len`` (prompt plus generated tokens).

A slug in ``settings.DEMO_OPENAI_BACKENDS`` is answered by an OpenAI-compatible server
instead (``openai_backend``): ``get_engine`` then returns its client, which the runner
drives exactly like an engine, and nothing here loads torch for it.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.conf import settings

if TYPE_CHECKING:  # pragma: no cover
    from inference_demo.llama.engine import Engine
    from inference_demo.openai_backend import OpenAIBackend

log = logging.getLogger(__name__)

ENGINE_DEFAULTS: dict[str, int] = {"max_batch_size": 16, "max_queue": 64, "max_seq_len": 1024}

_engines: dict[str, Engine | OpenAIBackend] = {}
_lock = threading.Lock()


class ModelUnavailable(Exception):
    """This process has no weights for the requested demo."""


def demo_slugs() -> list[str]:
    """Every release with a demo: the built-in engine's, then the OpenAI-compatible servers'."""
    backends = settings.DEMO_OPENAI_BACKENDS
    return [*(slug for slug in settings.DEMO_MODELS if slug not in backends), *backends]


def model_dir(slug: str) -> Path | None:
    """The release directory of a built-in demo model, or None when this process lacks it."""
    path = settings.DEMO_MODELS.get(slug)
    if path is None or slug in settings.DEMO_OPENAI_BACKENDS:
        return None
    path = Path(path)
    return path if (path / "params.json").is_file() else None


def is_available(slug: str) -> bool:
    """Whether this process can serve the demo now: it holds the weights, or the server answers."""
    if slug in settings.DEMO_OPENAI_BACKENDS:
        return _backend(slug).reachable()
    return model_dir(slug) is not None


def available_slugs() -> list[str]:
    return [slug for slug in demo_slugs() if is_available(slug)]


def engine_options() -> dict[str, int]:
    return {**ENGINE_DEFAULTS, **getattr(settings, "DEMO_ENGINE", {})}


def resolve_device(setting: str | None = None) -> str:
    """``auto`` picks CUDA when this machine has it, else the CPU."""
    setting = (setting or settings.DEMO_DEVICE or "auto").strip()
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def get_engine(slug: str) -> Engine | OpenAIBackend:
    """The started engine for ``slug``, loading it once per process (thread-safe); for a
    slug in ``DEMO_OPENAI_BACKENDS`` the client of its server instead."""
    engine = _engines.get(slug)
    if engine is not None:
        return engine
    with _lock:
        engine = _engines.get(slug)
        if engine is not None:
            return engine
        if slug in settings.DEMO_OPENAI_BACKENDS:
            return _backend_locked(slug)
        directory = model_dir(slug)
        if directory is None:
            raise ModelUnavailable(f"this process holds no weights for the demo {slug!r}")
        from inference_demo.llama.engine import open_engine

        device = resolve_device()
        options = engine_options()
        log.info("loading demo model %s from %s on %s (%s)", slug, directory, device, options)
        engine = open_engine(directory, device=device, **options)
        _engines[slug] = engine
        return engine


def _backend(slug: str) -> OpenAIBackend:
    """The client of the OpenAI-compatible server that answers ``slug`` (no network here)."""
    with _lock:
        return _backend_locked(slug)


def _backend_locked(slug: str) -> OpenAIBackend:
    from inference_demo.openai_backend import OpenAIBackend

    backend = _engines.get(slug)
    if backend is None:
        config = settings.DEMO_OPENAI_BACKENDS[slug]
        log.info("demo %s is served by %s (model %s)", slug, config.base_url, config.model)
        backend = _engines[slug] = OpenAIBackend(config)
    return backend


def engine_is_healthy(engine: Any) -> bool:
    """False once the engine's thread has died (it then refuses every submit)."""
    return bool(engine.is_running)


def discard_engine(slug: str, engine: Engine) -> None:
    """Drop a failed engine so that the next request loads a fresh one.

    Only the given engine is dropped: a replacement another thread loaded meanwhile stays.
    """
    with _lock:
        if _engines.get(slug) is engine:
            del _engines[slug]
    try:
        engine.stop(timeout=5)
    except Exception:  # a broken engine must not break the caller's error path
        log.exception("stopping the failed demo engine %s", slug)
    release_memory()


def release_memory() -> None:
    """After an out-of-memory error, hand cached CUDA blocks back (no-op without torch/CUDA)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_out_of_memory(exc: BaseException) -> bool:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()


def reset() -> None:
    """Stop and forget every engine of this process (tests, settings changes)."""
    with _lock:
        engines = list(_engines.values())
        _engines.clear()
    for engine in engines:
        engine.stop(timeout=5)
