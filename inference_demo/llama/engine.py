"""Continuous batching: one model, many concurrent requests, one background thread.

Requests wait in a bounded queue, join a fixed set of batch slots between decode
steps (prefill into their slot's cache rows) and leave when done or cancelled. The
decode step always runs on all ``max_batch_size`` slots with fixed shapes, idle slots
padded, so on CUDA it can be compiled and captured in a CUDA graph.

Failures end only the requests they concern: a request whose admission, prefill or
sampling raises gets that exception as its last event and its slot back; a decode step
that raises ends the rows of that step. The step is one fixed-shape call for the whole
batch (a CUDA graph on CUDA), so its rows are not retried one by one; instead one
padded decode on the now idle batch probes the device. If that fails too, the model
is unusable (a lost device, a poisoned CUDA context): the engine ends every waiting
request with the error and stops, and the runtime loads a fresh one. Every request
taken off the queue gets a final event, whatever happens.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import load_model
from .generation import (
    Completion,
    DecodeFn,
    SamplingParams,
    SequenceState,
    compile_decode,
    decode_one_token,
    prefill,
    sample,
)
from .model import Transformer
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

ERR_QUEUE_FULL = "the demo is busy: {n} requests are already waiting, try again shortly"
ERR_STOPPED = "the engine is not running"


class QueueFull(Exception):
    pass


class EngineStopped(Exception):
    pass


@dataclass
class _Event:
    delta: str = ""
    completion: Completion | None = None
    error: BaseException | None = None


class Request(Iterator[str]):
    """A submitted request: iterate for text deltas, then read ``completion``."""

    def __init__(self, engine: Engine, rid: int, state: SequenceState) -> None:
        self.id = rid
        self._engine = engine
        self._state = state
        self._events: queue.Queue[_Event] = queue.Queue()
        self.cancelled = threading.Event()
        self.completion: Completion | None = None

    @property
    def queue_position(self) -> int:
        """1 for the next request to be admitted, 0 once running or finished."""
        return self._engine._position(self)

    def cancel(self) -> None:
        """A waiting request ends now; a running one within one decode step."""
        self._engine._cancel(self)

    def __next__(self) -> str:
        if self.completion is not None:
            raise StopIteration
        event = self._events.get()
        if event.error is not None:
            raise event.error
        if event.completion is not None:
            self.completion = event.completion
            raise StopIteration
        return event.delta

    def result(self) -> Completion:
        for _ in self:
            pass
        assert self.completion is not None
        return self.completion

    def _push(self, delta: str) -> None:
        if delta:
            self._events.put(_Event(delta=delta))

    def _finish(self) -> None:
        self._events.put(_Event(completion=self._state.completion()))


class Engine:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        max_batch_size: int = 8,
        max_queue: int = 32,
        max_seq_len: int | None = None,
        decode: DecodeFn = decode_one_token,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.max_seq_len = max_seq_len or model.args.max_seq_len
        self.device = model.output.weight.device
        self.decode = decode
        model.setup_caches(max_batch_size, self.max_seq_len)
        self.tokens = torch.zeros(max_batch_size, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(max_batch_size, 1, dtype=torch.long, device=self.device)
        self.slots: list[Request | None] = [None] * max_batch_size
        self.waiting: deque[Request] = deque()
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._error: BaseException | None = None

    # Public API, called from any thread.

    def start(self) -> Engine:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="llama-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def submit(self, prompt: str | list[int], params: SamplingParams | None = None) -> Request:
        """Queue a request; raises QueueFull when ``max_queue`` requests already wait."""
        ids = (
            self.tokenizer.encode(prompt, bos=True, eos=False)
            if isinstance(prompt, str)
            else prompt
        )
        params = params or SamplingParams()
        state = SequenceState(
            self.tokenizer, ids, params, context_len=self.max_seq_len, device=self.device
        )
        with self._cond:
            if self._thread is None or self._stopping or self._error is not None:
                raise EngineStopped(ERR_STOPPED)
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(ERR_QUEUE_FULL.format(n=len(self.waiting)))
            request = Request(self, next(self._ids), state)
            self.waiting.append(request)
            self._cond.notify_all()
        return request

    @property
    def active(self) -> int:
        return sum(slot is not None for slot in self.slots)

    @property
    def is_running(self) -> bool:
        """False before start(), after stop(), and once the engine thread has failed."""
        thread = self._thread
        return thread is not None and thread.is_alive() and not self._stopping and not self._error

    # Engine thread.

    def _position(self, request: Request) -> int:
        with self._cond:
            for i, waiting in enumerate(self.waiting, start=1):
                if waiting is request:
                    return i
        return 0

    def _cancel(self, request: Request) -> None:
        with self._cond:
            request.cancelled.set()
            if request in self.waiting:
                self.waiting.remove(request)
                self._end(request, "cancelled")
            self._cond.notify_all()

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while self._wait_for_work():
                    self._drop_cancelled()
                    self._admit()
                    if self.active:
                        self._step()
        except BaseException as exc:  # the worker must report, never die silently
            self._fail(exc)
            return
        with self._cond:  # stopped: whatever is left ends as cancelled
            pending = [*self.waiting, *(r for r in self.slots if r is not None)]
            self.waiting.clear()
            self.slots = [None] * self.max_batch_size
        for request in pending:
            self._end(request, "cancelled")

    def _wait_for_work(self) -> bool:
        with self._cond:
            while not self._stopping and not self.waiting and not self.active:
                self._cond.wait()
            return not self._stopping

    def _drop_cancelled(self) -> None:
        for i, request in enumerate(self.slots):
            if request is not None and request.cancelled.is_set():
                self._end(request, "cancelled")
                self.slots[i] = None

    def _admit(self) -> None:
        for slot, occupant in enumerate(self.slots):
            if occupant is not None:
                continue
            while self.slots[slot] is None:  # a request that fails here leaves the slot free
                with self._cond:
                    if not self.waiting:
                        return
                    request = self.waiting.popleft()
                try:
                    self._prefill_into(slot, request)
                except BaseException as exc:
                    self.slots[slot] = None
                    self._fail_request(request, exc, "prefill")
                    if not isinstance(exc, Exception):
                        raise

    def _prefill_into(self, slot: int, request: Request) -> None:
        state = request._state
        state.timings.queued_s = time.perf_counter() - state.started
        logits = prefill(self.model, state.prompt_ids, first_row=slot)
        token = int(sample(logits, state.params, state.generator))
        self.tokens[slot, 0] = token
        request._push(state.accept(token))
        if state.finish_reason is not None:
            request._finish()
            return
        self.slots[slot] = request

    def _step(self) -> None:
        positions = [r._state.next_pos if r is not None else 0 for r in self.slots]
        try:
            self.pos.copy_(torch.tensor(positions).view(-1, 1), non_blocking=True)
            logits = self.decode(self.model, self.tokens, self.pos)  # [B, V]
            chosen = torch.argmax(logits, dim=-1)
        except Exception as exc:
            self._fail_step(exc)
            return
        for slot, request in enumerate(self.slots):
            if request is not None and request._state.params.temperature > 0:
                state = request._state
                try:
                    chosen[slot] = sample(logits[slot], state.params, state.generator)
                except Exception as exc:
                    self.slots[slot] = None
                    self._fail_request(request, exc, "sampling")
        self.tokens.copy_(chosen.view(-1, 1))
        for slot, token in enumerate(chosen.tolist()):
            request = self.slots[slot]
            if request is None:
                continue
            try:
                request._push(request._state.accept(token))
                if request._state.finish_reason is not None:
                    self.slots[slot] = None
                    request._finish()
            except Exception as exc:
                self.slots[slot] = None
                self._fail_request(request, exc, "detokenizing")

    def _fail_step(self, exc: Exception) -> None:
        """A decode step raised: its rows end; the engine goes on if the device still works."""
        rows = [request for request in self.slots if request is not None]
        self.slots = [None] * self.max_batch_size
        probe_exc = self._probe()
        if probe_exc is not None:  # refuse new work before anyone hears of the failure
            log.error("llama engine: decode fails on an idle batch too, stopping: %r", probe_exc)
            with self._cond:
                self._error = probe_exc
        for request in rows:
            self._fail_request(request, exc, "decode")
        if probe_exc is not None:
            raise probe_exc from exc

    def _probe(self) -> Exception | None:
        """One decode step on the idle, padded batch: None when the device still works."""
        if self.device.type == "cuda":  # an out-of-memory step leaves cached blocks behind
            torch.cuda.empty_cache()
        try:
            self.tokens.zero_()
            self.pos.zero_()
            self.decode(self.model, self.tokens, self.pos)
        except Exception as probe_exc:
            return probe_exc
        return None

    def _fail_request(self, request: Request, exc: BaseException, stage: str) -> None:
        log.error("llama engine: request %s failed in %s: %r", request.id, stage, exc, exc_info=exc)
        note = f"llama engine: {stage} failed"
        if note not in getattr(exc, "__notes__", ()):
            exc.add_note(note)
        request._events.put(_Event(error=exc))

    def _end(self, request: Request, reason: str) -> None:
        try:
            request._push(request._state.finish(reason))
            request._finish()
        except Exception as exc:
            self._fail_request(request, exc, "finishing")

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            self._error = exc
            pending = [*self.waiting, *(r for r in self.slots if r is not None)]
            self.waiting.clear()
            self.slots = [None] * self.max_batch_size
        for request in pending:
            request._events.put(_Event(error=exc))


def open_engine(
    release: str | Path,
    *,
    tokenizer: str | Path | None = None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    max_batch_size: int = 8,
    max_queue: int = 32,
    max_seq_len: int = 1024,
    compile: bool | None = None,
    verify: bool = True,
) -> Engine:
    """Load a Meta-layout release and start an engine on it.

    bfloat16 and a compiled, CUDA-graph decode step on CUDA; float32 and eager on the CPU
    (where compiling costs tens of seconds at start-up). ``tokenizer`` defaults to the
    release directory's ``tokenizer.model``, else its parent's (Meta's family layout).
    """
    release, target = Path(release), torch.device(device)
    cuda = target.type == "cuda"
    model = load_model(
        release,
        device=target,
        dtype=dtype or (torch.bfloat16 if cuda else torch.float32),
        max_seq_len=max_seq_len,
        verify=verify,
    )
    if tokenizer is None:
        tokenizer = release / "tokenizer.model"
        if not tokenizer.exists():
            tokenizer = release.parent / "tokenizer.model"
    decode = compile_decode(target) if (cuda if compile is None else compile) else decode_one_token
    engine = Engine(
        model,
        Tokenizer(tokenizer),
        max_batch_size=max_batch_size,
        max_queue=max_queue,
        max_seq_len=max_seq_len,
        decode=decode,
    )
    return engine.start()
