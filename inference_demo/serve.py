"""An OpenAI-compatible HTTP server on the batching engine (docs/openai_server.md).

    python -m inference_demo.serve MODEL_DIR [--host 127.0.0.1] [--port 8001]
        [--model-name NAME] [--api-key KEY]

Serves ``GET /v1/models``, ``POST /v1/completions`` and ``POST /v1/chat/completions``
(streaming as Server-Sent Events in OpenAI's chunk format) from one engine, on the
standard library's threading HTTP server: one thread per connection, all of them
submitting to the engine, which batches them. Its own process, so importing torch is
fine here (the portal's web process never imports this module).
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import json
import logging
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from inference_demo.openai_protocol import (
    ApiError,
    Job,
    bad_request,
    chunk,
    model_not_found,
    models_body,
    parse_chat,
    parse_completion,
    response_body,
    usage,
    usage_chunk,
)

log = logging.getLogger("inference_demo.serve")

MAX_BODY_BYTES = 1 << 20
DISCONNECT_POLL_S = 0.1
IDLE_TIMEOUT_S = 120.0  # a keep-alive connection with no request for this long is closed
ROUTES = {
    "/v1/models": ("GET",),
    "/v1/completions": ("POST",),
    "/v1/chat/completions": ("POST",),
}


class ClientGone(Exception):
    pass


@dataclass
class ServerState:
    engine: Any  # inference_demo.llama.engine.Engine
    model_name: str
    api_key: str | None
    created: int
    max_body_bytes: int = MAX_BODY_BYTES


class DisconnectWatch(threading.Thread):
    """Cancels an engine request as soon as its client closes the connection.

    Writes only notice a closed socket when there is something to write; a request that
    waits in the queue or holds back text for a stop sequence has nothing, so the socket
    is polled for end-of-file instead.
    """

    def __init__(self, sock: socket.socket, request: Any) -> None:
        super().__init__(name=f"watch-{request.id}", daemon=True)
        self.sock, self.request = sock, request
        self.done = threading.Event()
        self.gone = False

    def run(self) -> None:
        while not self.done.is_set():
            try:
                readable, _, _ = select.select([self.sock], [], [], DISCONNECT_POLL_S)
                if readable and not self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                    self._client_gone()
                    return
            except BlockingIOError:
                continue
            except (OSError, ValueError):  # reset, or the socket is closed already
                self._client_gone()
                return

    def _client_gone(self) -> None:
        if not self.done.is_set():
            self.gone = True
            self.request.cancel()


def _sampling_params(job: Job) -> Any:
    from inference_demo.llama.generation import SamplingParams

    return SamplingParams(
        max_new_tokens=job.max_tokens,
        temperature=job.temperature,
        top_k=job.top_k,
        top_p=job.top_p,
        stop=job.stop,
        seed=job.seed,
    )


def submit(engine: Any, job: Job) -> Any:
    """The engine request for ``job``; refusals become API errors."""
    from inference_demo.llama.engine import EngineStopped, QueueFull
    from inference_demo.llama.generation import PromptTooLong

    try:
        return engine.submit(job.prompt, _sampling_params(job))
    except PromptTooLong as exc:
        raise bad_request(
            f"This model's context is {engine.max_seq_len} tokens: {exc}",
            param=job.prompt_param,
            code="context_length_exceeded",
        ) from exc
    except QueueFull as exc:
        raise ApiError(429, str(exc), type="server_busy", code="queue_full") from exc
    except EngineStopped as exc:
        raise engine_stopped() from exc
    except ValueError as exc:
        raise bad_request(str(exc)) from exc


def engine_stopped() -> ApiError:
    return ApiError(503, "the engine is not running", type="server_error", code="engine_stopped")


def generation_failed(exc: BaseException) -> ApiError:
    return ApiError(
        500,
        f"the model failed on this request: {type(exc).__name__}: {exc}",
        type="server_error",
        code="model_error",
    )


def _finish_in_background(job: Job, request: Any, client_gone: bool) -> None:
    """Log the outcome once the engine has let go of the request, without holding the reply."""

    def drain() -> None:
        with contextlib.suppress(Exception):  # a failure was answered already; log the outcome
            for _ in request:
                pass
        _log_outcome(job, request, client_gone)

    if request.completion is not None:
        _log_outcome(job, request, client_gone)
    else:
        threading.Thread(target=drain, name=f"drain-{job.id}", daemon=True).start()


def _log_outcome(job: Job, request: Any, client_gone: bool) -> None:
    completion = request.completion
    if completion is None:
        log.info("%s %s: failed%s", job.id, job.kind, " (client disconnected)" * client_gone)
        return
    log.info(
        "%s %s: finish_reason=%s prompt_tokens=%d completion_tokens=%d%s",
        job.id,
        job.kind,
        completion.finish_reason,
        completion.timings.prompt_tokens,
        len(completion.token_ids),
        " (client disconnected)" * client_gone,
    )


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; streams use chunked transfer encoding
    server_version = "inference-demo-openai/1"
    timeout = IDLE_TIMEOUT_S
    state: ServerState  # set on the subclass that make_server() builds

    # Dispatch.

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def _dispatch(self, method: str) -> None:
        self._body_read = self._responded = False
        try:
            self._authorize()
            path = self.path.split("?", 1)[0].rstrip("/")
            if path.startswith("/v1/models/"):
                self._only(method, ("GET",))
                self._retrieve_model(path.removeprefix("/v1/models/"))
                return
            if path not in ROUTES:
                raise ApiError(404, f"Invalid URL ({method} {path})", code="unknown_url")
            self._only(method, ROUTES[path])
            if path == "/v1/models":
                self._send_json(200, models_body(self.state.model_name, self.state.created))
                return
            body = self._read_json()
            if path == "/v1/completions":
                job = parse_completion(body, self.state.model_name)
            else:
                job = parse_chat(body, self.state.model_name, self.state.engine.max_seq_len)
            self._generate(job)
        except ApiError as error:
            self._send_error(error)
        except ClientGone:
            self.close_connection = True
        except Exception:
            log.exception("%s %s failed", method, self.path)
            self.close_connection = True
            if not self._responded:
                self._send_error(ApiError(500, "internal server error", type="server_error"))

    def _authorize(self) -> None:
        key = self.state.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    def _only(self, method: str, allowed: tuple[str, ...]) -> None:
        if method not in allowed:
            raise ApiError(
                405,
                f"Method {method} not allowed on {self.path}; use {', '.join(allowed)}",
                code="method_not_allowed",
            )

    def _retrieve_model(self, name: str) -> None:
        if name != self.state.model_name:
            raise model_not_found(name)
        self._send_json(200, models_body(name, self.state.created)["data"][0])

    def _read_json(self) -> Any:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or length is None:
            self.close_connection = True
            raise ApiError(411, "a Content-Length header is required", code="length_required")
        try:
            size = int(length)
        except ValueError:
            size = -1
        if size < 0:
            self.close_connection = True
            raise bad_request("invalid Content-Length")
        if size > self.state.max_body_bytes:
            self.close_connection = True
            raise ApiError(
                413,
                f"The request body is {size} bytes; the limit is {self.state.max_body_bytes}",
                code="request_too_large",
            )
        raw = self.rfile.read(size)
        self._body_read = True
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise bad_request(f"The request body is not valid JSON: {exc}") from None

    # Generation.

    def _generate(self, job: Job) -> None:
        engine = self.state.engine
        if not engine.is_running:
            raise engine_stopped()
        request = submit(engine, job)
        watch = DisconnectWatch(self.connection, request)
        watch.start()
        client_gone = False
        try:
            if job.stream:
                self._stream(job, request, watch)
            else:
                self._complete(job, request)
        except ClientGone:
            client_gone = True
            raise
        finally:
            watch.done.set()
            request.cancel()  # a no-op once finished; frees the slot on any other exit
            _finish_in_background(job, request, client_gone or watch.gone)

    def _complete(self, job: Job, request: Any) -> None:
        try:
            completion = request.result()
        except Exception as exc:
            raise generation_failed(exc) from exc
        if completion.finish_reason == "cancelled":
            raise engine_stopped()  # the client is gone, or the engine is stopping
        counts = usage(completion.timings.prompt_tokens, len(completion.token_ids))
        self._send_json(200, response_body(job, completion.text, completion.finish_reason, counts))

    def _stream(self, job: Job, request: Any, watch: DisconnectWatch) -> None:
        self._responded = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        failed = False
        for event in self._events(job, request):
            self._write_chunk(f"data: {json.dumps(event)}\n\n".encode())
            if watch.gone:
                raise ClientGone
            failed = "error" in event
        if not failed:  # as OpenAI: a stream that failed ends without [DONE]
            self._write_chunk(b"data: [DONE]\n\n")
        self._write_chunk(b"")

    def _events(self, job: Job, request: Any) -> Iterator[dict[str, Any]]:
        if job.kind == "chat":
            yield chunk(job, None)
        try:
            for delta in request:
                yield chunk(job, delta)
        except Exception as exc:  # headers are out: the error goes into the stream
            yield generation_failed(exc).body()
            return
        completion = request.completion
        if completion.finish_reason == "cancelled":
            yield engine_stopped().body()
            return
        yield chunk(job, "" if job.kind == "completion" else None, completion.finish_reason)
        if job.include_usage:
            yield usage_chunk(
                job, usage(completion.timings.prompt_tokens, len(completion.token_ids))
            )

    # Writing.

    def _write_chunk(self, data: bytes) -> None:
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except OSError as exc:  # BrokenPipe, ConnectionReset: the client went away
            raise ClientGone from exc

    def _send_json(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(body).encode()
        self._responded = True
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except OSError as exc:
            raise ClientGone from exc

    def _send_error(self, error: ApiError) -> None:
        if self.command != "GET" and not self._body_read:  # it would read as the next request
            self.close_connection = True
        headers = {}
        if error.status == HTTPStatus.METHOD_NOT_ALLOWED:
            path = self.path.split("?", 1)[0].rstrip("/")
            headers["Allow"] = ", ".join(ROUTES.get(path, ("GET",)))
        if error.status == HTTPStatus.UNAUTHORIZED:
            headers["WWW-Authenticate"] = "Bearer"
        try:
            self._send_json(error.status, error.body(), headers)
        except ClientGone:
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)


def make_server(state: ServerState, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"state": state})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m inference_demo.serve",
        description="OpenAI-compatible server for a Meta-layout LLaMA release.",
    )
    parser.add_argument("model_dir", type=Path, help="release directory (params.json, shards)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001, help="0 picks a free port")
    parser.add_argument(
        "--model-name", help="the model id clients send (default: the directory name)"
    )
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: auto)")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-queue", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not (args.model_dir / "params.json").is_file():
        print(f"{args.model_dir} has no params.json: not a release directory", file=sys.stderr)
        return 2
    import torch

    from inference_demo.llama.engine import open_engine

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = open_engine(
        args.model_dir,
        device=device,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        max_seq_len=args.max_seq_len,
    )
    name = args.model_name or args.model_dir.resolve().name
    state = ServerState(engine, name, args.api_key, int(time.time()), args.max_body_bytes)
    server = make_server(state, args.host, args.port)
    host, port = server.server_address[:2]
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"serving {name} on {device} at http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        engine.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
