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
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.conf import settings

if TYPE_CHECKING:  # pragma: no cover
    from inference_demo.llama.engine import Engine

log = logging.getLogger(__name__)

ENGINE_DEFAULTS: dict[str, int] = {"max_batch_size": 16, "max_queue": 64, "max_seq_len": 1024}

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


class ModelUnavailable(Exception):
    """This process has no weights for the requested demo."""


def model_dir(slug: str) -> Path | None:
    """The release directory of a demo model, or None when this process does not hold it."""
    path = settings.DEMO_MODELS.get(slug)
    if path is None:
        return None
    path = Path(path)
    return path if (path / "params.json").is_file() else None


def available_slugs() -> list[str]:
    return [slug for slug in settings.DEMO_MODELS if model_dir(slug) is not None]


def engine_options() -> dict[str, int]:
    return {**ENGINE_DEFAULTS, **getattr(settings, "DEMO_ENGINE", {})}


def resolve_device(setting: str | None = None) -> str:
    """``auto`` picks CUDA when this machine has it, else the CPU."""
    setting = (setting or settings.DEMO_DEVICE or "auto").strip()
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def get_engine(slug: str) -> Engine:
    """The started engine for ``slug``, loading it once per process (thread-safe)."""
    engine = _engines.get(slug)
    if engine is not None:
        return engine
    with _lock:
        engine = _engines.get(slug)
        if engine is not None:
            return engine
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


def engine_is_healthy(engine: Any) -> bool:
    """False once the engine's thread has died (it then refuses every submit)."""
    thread = getattr(engine, "_thread", None)
    return getattr(engine, "_error", None) is None and thread is not None and thread.is_alive()


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
