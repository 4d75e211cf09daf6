"""Demo workers announce themselves in Redis so the web can tell "unavailable" at once.

A Celery worker that consumes the ``demo`` queue starts a daemon thread at
``worker_init`` that refreshes ``demo:worker:<hostname>`` every ``EVERY_S`` seconds
with a TTL of ``TTL_S``: the key disappears within seconds of the worker dying, and
is deleted on a clean shutdown. The value names the demo models the worker holds.
Workers on other queues, and the web process, never start it. No torch here.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Any

from celery.signals import worker_init, worker_shutdown
from django.conf import settings

from inference_demo import runtime

log = logging.getLogger(__name__)

DEMO_QUEUE = "demo"
EVERY_S = 2.0
TTL_S = 6

_beats: dict[int, Heartbeat] = {}  # by id(worker controller)


class Heartbeat(threading.Thread):
    def __init__(self, hostname: str) -> None:
        super().__init__(name="demo-heartbeat", daemon=True)
        from inference_demo.transport import worker_key

        self.hostname = hostname
        self.key = worker_key(hostname)
        self.stopping = threading.Event()

    def payload(self) -> dict[str, Any]:
        return {
            "hostname": self.hostname,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "slugs": runtime.available_slugs(),
            "device": settings.DEMO_DEVICE,
            "at": time.time(),
        }

    def beat(self) -> None:
        from inference_demo.transport import redis_client

        redis_client().set(self.key, json.dumps(self.payload()), ex=TTL_S)

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.beat()
            except Exception as exc:  # Redis away for a moment: try again next beat
                log.warning("demo worker heartbeat failed: %r", exc)
            self.stopping.wait(EVERY_S)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=EVERY_S + 1)
        try:
            from inference_demo.transport import redis_client

            redis_client().delete(self.key)
        except Exception as exc:
            log.warning("could not remove the demo worker heartbeat: %r", exc)


def consumes_demo_queue(worker: Any) -> bool:
    queues = worker.app.amqp.queues.consume_from
    return bool(queues) and DEMO_QUEUE in queues


@worker_init.connect
def start_heartbeat(sender: Any = None, **kwargs: Any) -> None:
    if sender is None or not settings.REDIS_URL or not consumes_demo_queue(sender):
        return
    beat = Heartbeat(sender.hostname)
    try:
        beat.beat()  # visible before the first task arrives
    except Exception as exc:
        log.warning("demo worker heartbeat failed: %r", exc)
    beat.start()
    _beats[id(sender)] = beat
    log.info("demo worker %s serves %s", sender.hostname, runtime.available_slugs())


@worker_shutdown.connect
def stop_heartbeat(sender: Any = None, **kwargs: Any) -> None:
    beat = _beats.pop(id(sender), None)
    if beat is not None:
        beat.stop()
