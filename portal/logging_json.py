"""One JSON object per log line (LOG_FORMAT=json), with the request id and no tokens.

The token filter cleans the message; this formatter also cleans every other field
(exception text, extras) and replaces the request object Django attaches to its
records by method and path, so a download token cannot leave through a side door.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

from portal.logging_filters import redact

FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s"
RENAMED = {"asctime": "time", "levelname": "level", "name": "logger"}


class JsonFormatter(_JsonFormatter):
    def __init__(self, fmt: str | None = None, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("rename_fields", RENAMED)
        super().__init__(fmt or FIELDS, *args, **kwargs)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds")

    def process_log_record(self, log_record: dict[str, Any]) -> dict[str, Any]:
        request = log_record.pop("request", None)
        if hasattr(request, "method") and hasattr(request, "path"):
            log_record["method"] = request.method
            log_record["path"] = request.path
        log_record.setdefault("request_id", "-")
        return {key: _clean(value) for key, value in log_record.items()}


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return redact(str(value))
