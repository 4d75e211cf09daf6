"""Embedded-mode mail: print to the console and keep a copy as .eml under var/mail/.

Stdout is collected like any log, so what is printed has its secrets masked (download
links, password-reset and email-confirmation keys, see ``portal.logging_filters``). The
.eml copy is the developer's mailbox and keeps the message whole.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.mail import EmailMessage
from django.core.mail.backends.console import EmailBackend as ConsoleBackend
from django.utils import timezone

from portal.logging_filters import redact


class ConsoleAndFileBackend(ConsoleBackend):
    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        sent = super().send_messages(email_messages) or 0
        directory = Path(settings.EMAIL_FILE_PATH)
        directory.mkdir(parents=True, exist_ok=True)
        for message in email_messages:
            stamp = timezone.now().strftime("%Y%m%d-%H%M%S")
            path = directory / f"{stamp}-{uuid.uuid4().hex[:8]}.eml"
            path.write_bytes(message.message().as_bytes())
        return sent

    def write_message(self, message: EmailMessage) -> None:
        super().write_message(masked_copy(message))


def masked_copy(message: EmailMessage) -> EmailMessage:
    """A copy of `message` whose subject, headers, bodies and text attachments are masked.

    Masked before MIME encoding: once quoted-printable folds a long line, a token split
    across two printed lines would no longer match."""
    masked = copy.copy(message)
    masked.subject = redact(message.subject)
    masked.body = redact(message.body)
    masked.extra_headers = {
        name: redact(value) if isinstance(value, str) else value
        for name, value in message.extra_headers.items()
    }
    masked.attachments = [_masked_part(part) for part in message.attachments]
    if hasattr(message, "alternatives"):
        masked.alternatives = [_masked_part(part) for part in message.alternatives]
    return masked


def _masked_part(part: Any) -> Any:
    # (content, mimetype) alternatives and (filename, content, mimetype) attachments;
    # a prebuilt MIME part is left as it is.
    if not isinstance(part, tuple):
        return part
    values = [redact(value) if isinstance(value, str) else value for value in part]
    return part._make(values) if hasattr(part, "_make") else tuple(values)
