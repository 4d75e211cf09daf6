"""gunicorn settings for the portal's web service (docker-compose.yml, `make prove`).

Every value can be changed through the environment (GUNICORN_*), and command-line
flags still win over this file. Two things here are security properties:

* No bearer secret reaches a log: download tokens, password-reset and
  email-confirmation keys are masked in every access and error line (request line,
  path, referer, headers), with the same ``portal.logging_filters.redact`` that masks
  Django's own logs. The access line quotes the raw request target, which gunicorn
  percent-decodes (``%2f`` included) before Django routes it, so ``/%64/<token>/`` is a
  link too: ``redact`` decodes and resolves each URL before masking it.
* The client address is the real one: behind nginx the TCP peer is nginx, so a
  request from a trusted proxy (``FORWARDED_ALLOW_IPS``) has ``REMOTE_ADDR``
  replaced by the right-most ``X-Forwarded-For`` entry, the address nginx saw.
  Download IP flagging and rate limits read ``REMOTE_ADDR``.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

from gunicorn.glogging import Logger

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from portal.logging_filters import RedactTokensFilter  # noqa: E402

wsgi_app = "portal.wsgi:application"
bind = [os.environ.get("GUNICORN_BIND", "0.0.0.0:8000")]  # noqa: S104 (inside a container)

# Threads, not processes, carry the concurrency: a demo stream (SSE) or a slow
# client holds a thread, not a process. Downloads never hold one for long:
# S3 answers with a redirect, local storage with X-Accel-Redirect to nginx.
worker_class = "gthread"
workers = int(os.environ.get("GUNICORN_WORKERS", "3"))
threads = int(os.environ.get("GUNICORN_THREADS", "8"))
# gthread workers heartbeat from their main loop, so a long stream is not killed;
# this bounds a worker that stops responding altogether.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "60"))
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "30"))
# nginx keeps upstream connections open (keepalive 32); keep ours a little longer.
keepalive = int(os.environ.get("GUNICORN_KEEPALIVE", "75"))
# Recycle workers now and then: bounds any slow leak, spread out by the jitter.
max_requests = int(os.environ.get("GUNICORN_MAX_REQUESTS", "2000"))
max_requests_jitter = int(os.environ.get("GUNICORN_MAX_REQUESTS_JITTER", "200"))
# Container filesystems can be slow for the heartbeat file; shared memory is not.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None  # noqa: S108
limit_request_line = 8190
limit_request_fields = 100

# Trusted proxies (exact addresses or "*"): only these peers may set the client
# address and scheme. In docker-compose.yml the web service is reachable only on
# the private network, from nginx, so it trusts "*".
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")

accesslog = os.environ.get("GUNICORN_ACCESS_LOG", "-")
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOG_LEVEL", "info")
# The request id: nginx's $request_id (X-Request-ID), as the portal echoes it back.
access_log_format = (
    '%(h)s "%(r)s" %(s)s %(B)s %(M)sms "%(f)s" "%(a)s" request_id=%({x-request-id}o)s'
)


class RedactingLogger(Logger):
    """gunicorn's logger with every download token masked, in access and error lines."""

    def setup(self, cfg) -> None:
        super().setup(cfg)
        for log in (self.access_log, self.error_log):
            if not any(isinstance(f, RedactTokensFilter) for f in log.filters):
                log.addFilter(RedactTokensFilter())


logger_class = RedactingLogger


def _trusted(peer: str, allowed: list[str]) -> bool:
    if "*" in allowed:
        return True
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    for entry in allowed:
        try:
            if address in ipaddress.ip_network(entry.strip(), strict=False):
                return True
        except ValueError:
            continue
    return False


def real_client_address(app, allowed: list[str]):
    """Wrap a WSGI app: REMOTE_ADDR becomes the client address a trusted proxy saw."""

    def application(environ, start_response):
        peer = environ.get("REMOTE_ADDR", "")
        forwarded = environ.get("HTTP_X_FORWARDED_FOR", "")
        if forwarded and _trusted(peer, allowed):
            client = forwarded.split(",")[-1].strip()
            try:
                ipaddress.ip_address(client)
            except ValueError:
                pass
            else:
                environ["REMOTE_ADDR"] = client
        return app(environ, start_response)

    return application


def post_worker_init(worker) -> None:
    # The environ the app sees is the one the access log reads, so the log shows it too.
    worker.wsgi = real_client_address(worker.wsgi, list(worker.cfg.forwarded_allow_ips))


def worker_exit(server, worker) -> None:
    # A stopping worker inserts its journalled download events now rather than leaving them
    # to the next sweep; a worker that never loaded the journal module has none.
    journal = sys.modules.get("weights.services.event_journal")
    if journal is not None:
        journal.journal_close()
