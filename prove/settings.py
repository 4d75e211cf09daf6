"""The portal's own settings plus one trivial URL for `make prove`; nothing else changes.

`/_prove/trivial/` is a Django view that runs the whole middleware stack and touches no
database: the baseline the download endpoints are compared with when the portal has no
`/healthz` yet. The outbox/broker knobs below are read from PROVE_* variables so that a
fault scenario can shorten the waits it would otherwise sit through (an hour of broker
visibility timeout); unset, they are the portal's values.
"""

from __future__ import annotations

import os

from portal.settings import *  # noqa: F403
from portal.settings import CELERY_BROKER_TRANSPORT_OPTIONS

ROOT_URLCONF = "prove.urls"

if os.environ.get("PROVE_VISIBILITY_TIMEOUT"):
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        **CELERY_BROKER_TRANSPORT_OPTIONS,
        "visibility_timeout": int(os.environ["PROVE_VISIBILITY_TIMEOUT"]),
    }
if os.environ.get("PROVE_MAIL_DELAY_S"):
    EMAIL_BACKEND = "prove.mailer.SlowBackend"
