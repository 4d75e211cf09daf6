"""Prefill, one-token decode, sampling, and a streaming single-request generator."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .model import Transformer
from .tokenizer import StreamDecoder, Tokenizer

ERR_PROMPT_TOO_LONG = "prompt of {n} tokens leaves no room in a context of {limit}"
ERR_EMPTY_PROMPT = "the prompt is empty"


DecodeFn = Callable[[Transformer, Tensor, Tensor], Tensor]


class PromptTooLong(ValueError):
    pass


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy
    top_k: int | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int = 0
    ignore_eos: bool = False  # for benchmarks that need a fixed length

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must not be negative")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("top_k must be at least 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")


@dataclass
class Timings:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    queued_s: float = 0.0
    ttft_s: float = 0.0  # submit (or call) to first token, queueing included
    total_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """Decode rate after the first token."""
        decode_s = self.total_s - self.ttft_s
        return (self.generated_tokens - 1) / decode_s if decode_s > 0 else 0.0


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop", "length" or "cancelled"
    timings: Timings
    # When each of token_ids was sampled: perf_counter seconds since submit (the clock of
    # timings.ttft_s), for inter-token latencies.
    token_times: list[float] = field(default_factory=list)


# Sampling: pure functions over logits [R, V], one row per sequence, batched over rows.


@dataclass(frozen=True)
class RowSampling:
    """Each row's sampling parameters as columns [R, 1], for one batched call."""

    temperature: Tensor  # float32, at least 1e-5
    top_k: Tensor | None  # long, 0 where a row has no cut; None where no row has one
    k_max: int  # the largest top_k (topk needs a Python int: no device sync for it)
    top_p: Tensor | None  # float32, 1.0 where a row has no cut; None where no row has one

    @classmethod
    def of(
        cls, params: Sequence[SamplingParams], vocab_size: int, device: torch.device
    ) -> RowSampling:
        ks = [p.top_k if p.top_k is not None and p.top_k < vocab_size else 0 for p in params]
        ps = [p.top_p if p.top_p is not None and p.top_p < 1.0 else 1.0 for p in params]

        def column(values: list[float] | list[int], dtype: torch.dtype) -> Tensor:
            return torch.tensor(values, dtype=dtype, device=device).view(-1, 1)

        return cls(
            temperature=column([max(p.temperature, 1e-5) for p in params], torch.float32),
            top_k=column(ks, torch.long) if any(ks) else None,
            k_max=max(ks),
            top_p=column(ps, torch.float32) if any(p < 1.0 for p in ps) else None,
        )


def row_probs(logits: Tensor, rows: RowSampling) -> Tensor:
    """[R, V] logits to probabilities at each row's temperature, top-k and top-p."""
    logits = logits.float() / rows.temperature
    if rows.top_k is not None:
        kth = torch.topk(logits, rows.k_max, dim=-1).values.gather(-1, (rows.top_k - 1).clamp(0))
        kth = kth.masked_fill(rows.top_k == 0, float("-inf"))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if rows.top_p is not None:  # rows without a cut keep their probabilities bit for bit
        probs = torch.where(rows.top_p < 1.0, top_p_filter(probs, rows.top_p), probs)
    return probs


def sample_rows(logits: Tensor, rows: RowSampling, noise: Tensor) -> Tensor:
    """Token ids [R] from logits [R, V] and Exponential(1) noise [R, V].

    The noise is an argument so that each row can come from its own request's generator
    (reproducible whatever else is in the batch) while the rest is one batched computation;
    it also makes a retry of some rows exact.
    """
    # Exponential race instead of multinomial: same distribution, no device sync.
    return torch.argmax(row_probs(logits, rows) / noise, dim=-1)


def logits_to_probs(logits: Tensor, temperature: float, top_k: int | None = None) -> Tensor:
    """Probabilities [..., V] at one temperature and top-k for every row."""
    flat = logits.reshape(-1, logits.shape[-1])
    params = SamplingParams(temperature=temperature, top_k=top_k)
    rows = RowSampling.of([params] * flat.shape[0], flat.shape[-1], logits.device)
    return row_probs(flat, rows).view(logits.shape)


def top_p_filter(probs: Tensor, p: float | Tensor) -> Tensor:
    """Keep the smallest set of tokens whose mass reaches ``p`` (Meta's ``sample_top_p``);
    ``p`` is a number or a column [R, 1], one per row."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> Tensor:
    """Next token ids [...] from logits [..., V], every row with the same ``params``."""
    if params.temperature <= 0:
        return torch.argmax(logits, dim=-1)
    flat = logits.reshape(-1, logits.shape[-1])
    noise = torch.empty(flat.shape, dtype=torch.float32, device=flat.device)
    noise.exponential_(1.0, generator=generator)
    rows = RowSampling.of([params] * flat.shape[0], flat.shape[-1], flat.device)
    return sample_rows(flat, rows, noise).view(logits.shape[:-1])


def prefill(
    model: Transformer, ids: Sequence[int], first_row: int = 0, *, start: int = 0
) -> Tensor:
    """Run prompt tokens at positions [start, start + len(ids)) into cache row ``first_row``,
    attending to what the row holds before ``start``; logits of the last position [V].

    ``start=0`` with the whole prompt is a plain prefill; later chunks continue it.
    """
    device = model.output.weight.device
    tokens = torch.tensor([list(ids)], device=device)
    pos = torch.arange(start, start + len(ids), device=device).unsqueeze(0)
    return model(tokens, pos, first_row, last_only=True)[0, -1]


def decode_one_token(model: Transformer, tokens: Tensor, pos: Tensor) -> Tensor:
    """tokens, pos [B, 1] -> logits [B, V]; shapes stay fixed, so this compiles cleanly."""
    return model(tokens, pos)[:, -1]


def compile_decode(device: torch.device) -> DecodeFn:
    """``decode_one_token`` compiled for fixed shapes; on CUDA also captured in CUDA graphs."""
    if device.type == "cuda":
        return torch.compile(
            decode_one_token, mode="reduce-overhead", fullgraph=True, dynamic=False
        )
    # On the CPU a C++ wrapper around the kernels saves another ~10 % of per-token overhead.
    return torch.compile(
        decode_one_token, fullgraph=True, dynamic=False, options={"cpp_wrapper": True}
    )


class StopMatcher:
    """Cuts the text at the first stop string, holding back what may be the start of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        text = self.held + delta
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[: min(hits)], True
        keep = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), keep, -1):
                if text.endswith(stop[:k]):
                    keep = k
                    break
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


class SequenceState:
    """Per-request bookkeeping shared by ``generate`` and the batching engine."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        context_len: int,
        device: torch.device,
        started: float | None = None,
    ) -> None:
        if not prompt_ids:
            raise ValueError(ERR_EMPTY_PROMPT)
        if len(prompt_ids) >= context_len:
            raise PromptTooLong(ERR_PROMPT_TOO_LONG.format(n=len(prompt_ids), limit=context_len))
        self.tokenizer, self.prompt_ids, self.params = tokenizer, prompt_ids, params
        self.max_new = min(params.max_new_tokens, context_len - len(prompt_ids))
        self.generator = torch.Generator(device=device).manual_seed(params.seed)
        self.decoder = StreamDecoder(tokenizer, prompt_ids)
        self.stopper = StopMatcher(params.stop)
        self.generated: list[int] = []
        self.token_times: list[float] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.started = time.perf_counter() if started is None else started
        self.timings = Timings(prompt_tokens=len(prompt_ids))

    @property
    def next_pos(self) -> int:
        """Position of the token that was sampled last (fed into the next decode step)."""
        return len(self.prompt_ids) + len(self.generated) - 1

    def accept(self, token: int) -> str:
        """Take a sampled token; returns the text to emit and sets ``finish_reason`` if done."""
        now = time.perf_counter()
        if self.timings.ttft_s == 0.0:
            self.timings.ttft_s = now - self.started
        if token == self.tokenizer.eos_id and not self.params.ignore_eos:
            return self.finish("stop")
        self.generated.append(token)
        self.token_times.append(now - self.started)
        delta, stopped = self.stopper.feed(self.decoder.push(token))
        self.text += delta
        if stopped:
            return delta + self.finish("stop", flush=False)
        if len(self.generated) >= self.max_new:
            return delta + self.finish("length")
        return delta

    def finish(self, reason: str, *, flush: bool = True) -> str:
        tail = ""
        if flush:
            tail, stopped = self.stopper.feed(self.decoder.flush())
            tail += "" if stopped else self.stopper.flush()
        self.text += tail
        self.finish_reason = reason
        self.timings.generated_tokens = len(self.generated)
        self.timings.total_s = time.perf_counter() - self.started
        return tail

    def completion(self) -> Completion:
        assert self.finish_reason is not None
        return Completion(
            self.text, self.generated, self.finish_reason, self.timings, self.token_times
        )


class TextStream(Iterator[str]):
    """Iterate for text deltas; ``completion`` holds the text, reason and timings at the end."""

    def __init__(self, gen: Generator[str, None, Completion]) -> None:
        self._gen = gen
        self.completion: Completion | None = None

    def __next__(self) -> str:
        try:
            return next(self._gen)
        except StopIteration as stop:
            self.completion = stop.value
            raise

    def collect(self) -> Completion:
        for _ in self:
            pass
        assert self.completion is not None
        return self.completion


def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str | list[int],
    params: SamplingParams | None = None,
    *,
    decode: DecodeFn = decode_one_token,
) -> TextStream:
    """Stream one completion, using cache row 0 (call ``model.setup_caches`` first).

    ``decode`` may be a compiled ``decode_one_token`` (``torch.compile`` on CUDA).
    """
    ids = tokenizer.encode(prompt, bos=True, eos=False) if isinstance(prompt, str) else prompt
    return TextStream(_generate(model, tokenizer, ids, params or SamplingParams(), decode))


@torch.inference_mode()
def _generate(
    model: Transformer,
    tokenizer: Tokenizer,
    ids: list[int],
    params: SamplingParams,
    decode: DecodeFn,
) -> Generator[str, None, Completion]:
    device = model.output.weight.device
    state = SequenceState(tokenizer, ids, params, context_len=model.max_seq_len, device=device)
    token = sample(prefill(model, ids), params, state.generator).view(1, 1)
    pos = torch.zeros(1, 1, dtype=torch.long, device=device)
    while True:
        delta = state.accept(int(token))
        if delta:
            yield delta
        if state.finish_reason is not None:
            return state.completion()
        pos.fill_(state.next_pos)
        token = sample(decode(model, token, pos), params, state.generator).view(1, 1)
