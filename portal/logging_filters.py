"""Keep bearer tokens out of logs: download-link paths are logged with the token masked."""

from __future__ import annotations

import logging
import re

_LINK_PATH = re.compile(r"/d/[^/\s\"']+")


def redact(text: str) -> str:
    return _LINK_PATH.sub("/d/<token>", text)


class RedactTokensFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        return True
