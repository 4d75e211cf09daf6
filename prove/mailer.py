"""A mail backend that takes its time, so a worker can be killed in the middle of a send.

PROVE_MAIL_DELAY_S: seconds to wait; PROVE_MAIL_PHASE: `before` waits before the message
is written (killed there, nothing went out) or `after` waits once it is written (killed
there, the message went out but the task never finished). A marker file under
PROVE_MAIL_MARKERS says when a send has begun.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from portal.mail import ConsoleAndFileBackend


class SlowBackend(ConsoleAndFileBackend):
    def send_messages(self, email_messages) -> int:
        delay = float(os.environ.get("PROVE_MAIL_DELAY_S", "0"))
        phase = os.environ.get("PROVE_MAIL_PHASE", "before")
        markers = Path(os.environ.get("PROVE_MAIL_MARKERS", "/tmp"))  # noqa: S108
        markers.mkdir(parents=True, exist_ok=True)
        if phase == "before":
            (markers / f"sending-{uuid.uuid4().hex[:8]}").touch()
            time.sleep(delay)
            return super().send_messages(email_messages)
        sent = super().send_messages(email_messages)
        (markers / f"sent-{uuid.uuid4().hex[:8]}").touch()
        time.sleep(delay)
        return sent
