"""Embedded-mode mail: print to the console and keep a copy as .eml under var/mail/."""

from __future__ import annotations

import uuid
from pathlib import Path

from django.conf import settings
from django.core.mail.backends.console import EmailBackend as ConsoleBackend
from django.utils import timezone


class ConsoleAndFileBackend(ConsoleBackend):
    def send_messages(self, email_messages) -> int:
        sent = super().send_messages(email_messages)
        directory = Path(settings.EMAIL_FILE_PATH)
        directory.mkdir(parents=True, exist_ok=True)
        for message in email_messages:
            stamp = timezone.now().strftime("%Y%m%d-%H%M%S")
            path = directory / f"{stamp}-{uuid.uuid4().hex[:8]}.eml"
            path.write_bytes(message.message().as_bytes())
        return sent
