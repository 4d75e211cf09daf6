"""Continuous batching: one model, many concurrent requests, one background thread.

Requests wait in a bounded queue, take a free batch slot, prefill their prompt into that
slot's cache row and then decode with the others until done or cancelled. The decode
step always runs on all ``max_batch_size`` slots with fixed shapes, idle and prefilling
slots padded, so on CUDA it can be compiled and captured in a CUDA graph.

Prompts are prefilled in chunks of ``prefill_chunk`` tokens, one chunk per engine
iteration (the oldest prefilling request first) before each decode step, so a long prompt
joining a busy engine delays the decoding rows' next token by one chunk, not by its whole
prefill. Sampling is one batched computation over the rows that sample; only the noise
is drawn row by row, from each request's own generator, so a seeded request gives the
same text alone or in any batch.

Failures end only the requests they concern: a request whose admission, prefill (any
chunk) or sampling raises gets that exception as its last event and its slot back; a
decode step that raises ends the decoding rows of that step. The step is one fixed-shape call for the whole
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
from torch import Tensor

from .checkpoint import load_model
from .generation import (
    Completion,
    DecodeFn,
    RowSampling,
    SamplingParams,
    SequenceState,
    compile_decode,
    decode_one_token,
    prefill,
    sample,
    sample_rows,
)
from .model import Transformer
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

ERR_QUEUE_FULL = "the demo is busy: {n} requests are already waiting, try again shortly"
ERR_STOPPED = "the engine is not running"

# Prompt tokens per prefill chunk: what a joining prompt may delay the decoding rows by.
# On a GPU a chunk costs about one decode step (one read of the weights) until its matmuls
# turn compute-bound, at a few hundred tokens on current cards in bf16: 256 sits near that
# point, so chunking costs the prefill little throughput and stalls decoding by only a few
# steps' time. On the CPU compute dominates from a few tokens on, so the stall grows with
# the chunk while the per-call overhead that small chunks add stays a few percent from
# ~128 tokens up: 256 keeps both low. ``None`` prefills each prompt in one call.
PREFILL_CHUNK = 256


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
        self.prefilled = 0  # prompt tokens in the slot's cache row (engine thread only)

    @property
    def queue_position(self) -> int:
        """1 for the next request to be admitted, 0 once running or finished."""
        return self._engine._position(self)

    def cancel(self) -> None:
        """A waiting request ends now; a running one within one engine iteration (one
        prefill chunk and one decode step)."""
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
        prefill_chunk: int | None = PREFILL_CHUNK,
    ) -> None:
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError("prefill_chunk must be at least 1 (or None: whole prompts)")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.max_seq_len = max_seq_len or model.args.max_seq_len
        self.prefill_chunk = prefill_chunk
        self.device = model.output.weight.device
        self.decode = decode
        model.setup_caches(max_batch_size, self.max_seq_len)
        self.tokens = torch.zeros(max_batch_size, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(max_batch_size, 1, dtype=torch.long, device=self.device)
        vocab = model.args.vocab_size
        self.noise = torch.empty(max_batch_size, vocab, dtype=torch.float32, device=self.device)
        # Occupied slots, prefilling or decoding; those still prefilling, oldest first.
        self.slots: list[Request | None] = [None] * max_batch_size
        self.prefilling: deque[int] = deque()
        self.waiting: deque[Request] = deque()
        # Work done so far, for tests and benchmarks (written by the engine thread only).
        self.prefill_chunks = 0
        self.prefill_tokens = 0
        self.decode_steps = 0
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
                    if self.prefilling:
                        self._prefill_chunk()
                    if self._decoding():
                        self._step()
        except BaseException as exc:  # the worker must report, never die silently
            self._fail(exc)
            return
        with self._cond:  # stopped: whatever is left ends as cancelled
            pending = [*self.waiting, *(r for r in self.slots if r is not None)]
            self.waiting.clear()
            self._free_all()
        for request in pending:
            self._end(request, "cancelled")

    def _wait_for_work(self) -> bool:
        with self._cond:
            while not self._stopping and not self.waiting and not self.active:
                self._cond.wait()
            return not self._stopping

    def _drop_cancelled(self) -> None:
        for slot, request in enumerate(self.slots):
            if request is not None and request.cancelled.is_set():
                self._free(slot)
                self._end(request, "cancelled")

    def _free(self, slot: int) -> None:
        self.slots[slot] = None
        if slot in self.prefilling:
            self.prefilling.remove(slot)

    def _free_all(self) -> None:
        self.slots = [None] * self.max_batch_size
        self.prefilling.clear()

    def _decoding(self) -> list[int]:
        return [
            slot
            for slot, request in enumerate(self.slots)
            if request is not None and slot not in self.prefilling
        ]

    def _admit(self) -> None:
        """Free slots go to waiting requests, which start prefilling at the next chunk."""
        for slot, occupant in enumerate(self.slots):
            if occupant is not None:
                continue
            with self._cond:
                if not self.waiting:
                    return
                request = self.waiting.popleft()
            state = request._state
            state.timings.queued_s = time.perf_counter() - state.started
            request.prefilled = 0
            self.slots[slot] = request
            self.prefilling.append(slot)

    def _prefill_chunk(self) -> None:
        """One chunk of the oldest prefilling prompt; after its last, its first token."""
        slot = self.prefilling[0]
        request = self.slots[slot]
        assert request is not None
        state = request._state
        start, n = request.prefilled, len(state.prompt_ids)
        end = n if self.prefill_chunk is None else min(n, start + self.prefill_chunk)
        try:
            chunk = state.prompt_ids[start:end]
            self.prefill_chunks += 1
            self.prefill_tokens += len(chunk)
            # A first chunk is called exactly as a whole-prompt prefill (hooks that wrap
            # prefill with that signature, as the failure tests do, keep working).
            if start:
                logits = prefill(self.model, chunk, first_row=slot, start=start)
            else:
                logits = prefill(self.model, chunk, first_row=slot)
            request.prefilled = end
            if end < n:
                return
            self.prefilling.popleft()
            token = int(sample(logits, state.params, state.generator))
            self.tokens[slot, 0] = token
            request._push(state.accept(token))
            if state.finish_reason is not None:
                self.slots[slot] = None
                request._finish()
        except BaseException as exc:
            self._free(slot)
            self._fail_request(request, exc, "prefill")
            if not isinstance(exc, Exception):
                raise

    def _positions(self) -> Tensor:
        """Each slot's decode position. A prefilling slot is padded at the first position its
        next chunk writes: the pad's cache entry is overwritten before anything attends to
        it. Idle slots use 0, which a request admitted there prefills first."""
        positions = [0] * self.max_batch_size
        for slot, request in enumerate(self.slots):
            if request is not None:
                prefilling = slot in self.prefilling
                positions[slot] = request.prefilled if prefilling else request._state.next_pos
        return torch.tensor(positions).view(-1, 1)

    def _step(self) -> None:
        rows = self._decoding()
        try:
            self.pos.copy_(self._positions(), non_blocking=True)
            logits = self.decode(self.model, self.tokens, self.pos)  # [B, V]
            self.decode_steps += 1
            chosen = torch.argmax(logits, dim=-1)
        except Exception as exc:
            self._fail_step(exc, rows)
            return
        self._sample_into(chosen, logits, rows)
        self.tokens.copy_(chosen.view(-1, 1))
        tokens = chosen.tolist()
        for slot in rows:
            request = self.slots[slot]
            if request is None:  # failed in sampling
                continue
            try:
                request._push(request._state.accept(tokens[slot]))
                if request._state.finish_reason is not None:
                    self.slots[slot] = None
                    request._finish()
            except Exception as exc:
                self.slots[slot] = None
                self._fail_request(request, exc, "detokenizing")

    def _sample_into(self, chosen: Tensor, logits: Tensor, rows: list[int]) -> None:
        """Overwrite the argmax of the rows with a temperature by their sampled tokens.

        Noise comes row by row from each request's generator (a failing draw ends that
        request), then one batched call samples every row. If that call fails, each row is
        retried alone with the noise already drawn (so the retry is exact and generators
        stay in step), and only the rows that fail alone end.
        """
        drawn: list[int] = []
        for slot in rows:
            request = self.slots[slot]
            assert request is not None
            if request._state.params.temperature <= 0:
                continue
            try:
                self.noise[slot].exponential_(1.0, generator=request._state.generator)
            except Exception as exc:
                self.slots[slot] = None
                self._fail_request(request, exc, "sampling")
                continue
            drawn.append(slot)
        if not drawn:
            return
        try:
            index = torch.tensor(drawn, device=self.device)
            chosen[index] = self._sample_rows(logits[index], drawn, self.noise[index])
            return
        except Exception as exc:
            log.warning("llama engine: batched sampling failed, retrying row by row: %r", exc)
        for slot in drawn:
            request = self.slots[slot]
            assert request is not None
            try:
                one = slice(slot, slot + 1)
                chosen[one] = self._sample_rows(logits[one], [slot], self.noise[one])
            except Exception as exc:
                self.slots[slot] = None
                self._fail_request(request, exc, "sampling")

    def _sample_rows(self, logits: Tensor, slots: list[int], noise: Tensor) -> Tensor:
        params = []
        for slot in slots:
            request = self.slots[slot]
            assert request is not None
            params.append(request._state.params)
        return sample_rows(logits, RowSampling.of(params, logits.shape[-1], self.device), noise)

    def _fail_step(self, exc: Exception, rows: list[int]) -> None:
        """A decode step raised: its rows end; the engine goes on if the device still works.

        Prefilling rows were not in the step's output and go on (the probe pads them at a
        position their next chunk overwrites)."""
        failed = [self.slots[slot] for slot in rows]
        for slot in rows:
            self.slots[slot] = None
        probe_exc = self._probe()
        if probe_exc is not None:  # refuse new work before anyone hears of the failure
            log.error("llama engine: decode fails on an idle batch too, stopping: %r", probe_exc)
            with self._cond:
                self._error = probe_exc
        for request in failed:
            assert request is not None
            self._fail_request(request, exc, "decode")
        if probe_exc is not None:
            raise probe_exc from exc

    def _probe(self) -> Exception | None:
        """One decode step on the padded batch: None when the device still works."""
        if self.device.type == "cuda":  # an out-of-memory step leaves cached blocks behind
            torch.cuda.empty_cache()
        try:
            self.tokens.zero_()
            self.pos.copy_(self._positions())
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
            self._free_all()
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
    prefill_chunk: int | None = PREFILL_CHUNK,
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
        prefill_chunk=prefill_chunk,
    )
    return engine.start()
