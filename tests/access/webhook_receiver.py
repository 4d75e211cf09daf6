"""A real HTTP receiver on loopback for webhook tests, and the docs' verification snippet."""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parents[2] / "docs" / "webhooks.md"


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.body)


class Receiver:
    """Records every request (GET too, to catch a followed redirect); answers `status`
    with `answer` as the body, and a Location header if `location` is set."""

    def __init__(
        self, port: int = 0, *, status: int = 204, answer: bytes = b"", location: str = ""
    ) -> None:
        self.status = status
        self.answer = answer
        self.location = location
        self.received: list[Received] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.received.append(
                    Received(self.command, self.path, dict(self.headers.items()), body)
                )
                self.send_response(receiver.status)
                if receiver.location:
                    self.send_header("Location", receiver.location)
                self.send_header("Content-Length", str(len(receiver.answer)))
                self.end_headers()
                self.wfile.write(receiver.answer)

            do_GET = do_POST

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def types(self) -> list[str]:
        return [request.payload["type"] for request in self.received]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@contextlib.contextmanager
def receiving(port: int = 0, **options: Any) -> Iterator[Receiver]:
    receiver = Receiver(port, **options)
    try:
        yield receiver
    finally:
        receiver.stop()


def docs_block(name: str) -> str:
    """The fenced code between `<!-- name: begin ... -->` and `<!-- name: end -->`."""
    text = DOCS.read_text()
    match = re.search(
        rf"<!-- {name}: begin[^>]*-->\n```\w+\n(.*?)```\n<!-- {name}: end -->", text, re.S
    )
    assert match, f"docs/webhooks.md has no {name} block"
    return match.group(1)


def documented_verify() -> Callable[[str, bytes, str], bool]:
    namespace: dict[str, Any] = {}
    exec(compile(docs_block("verify-snippet"), str(DOCS), "exec"), namespace)  # noqa: S102
    return namespace["verify"]
