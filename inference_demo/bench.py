"""Inference benchmark: our engine next to transformers' best path, same weights, same device.

    python -m inference_demo.bench                  # CPU, the bundled demo model, eager + compiled
    python -m inference_demo.bench --no-compile     # eager only, on both sides
    python -m inference_demo.bench --gpu            # = --device cuda --config 7b
    python -m inference_demo.bench --config tiny --new-tokens 16 --no-compile  # smoke test

Sections, each with ours and transformers interleaved run by run (medians of ``--runs``
after one warm-up round, which also compiles):

1. batch 1: tokens/s of one greedy request, ours eager and compiled, against transformers'
   ``generate()`` with a dynamic cache, a static cache, and a static cache with its compiled
   decode forward (see ``bench_transformers``); like with like and ours against their best;
2. time to first token for a ``--prompt-tokens`` prompt, both sides;
3. ``--users`` concurrent requests (prompts of 4 to 64 tokens): our engine against one
   left-padded batched ``generate()`` of the same prompts, aggregate tokens/s;
4. staggered arrivals: ``--stagger-requests`` requests arriving over ``--stagger-seconds``
   (exponential gaps, fixed seed) with mixed prompt and output lengths; our engine gets each
   at its arrival time, transformers serves arrival-order batches (whatever has arrived when
   it is idle, run to the longest output in it) on each eager path, and on its compiled path
   if that was its fastest batched one, every batch then padded to one fixed shape so that
   it compiles once; makespan and per-request latency (arrival to last token);
5. mixed load: ``--mixed-rows`` requests decoding when a ``--long-prompt-tokens`` prompt
   arrives; p95 and max gap between the running rows' tokens while it is admitted and
   prefilled, and its time to first token (chunked and unchunked prefill where the engine
   takes a ``prefill_chunk``).

Ours in the headline mode (compiled, or eager with ``--no-compile``) gives the unprefixed
figures (``ours_batch1_tok_s``, ``engine_*_users_tok_s``, ``mixed_*``); ``*speedup_*`` keys
compare eager with eager, compiled with compiled, and the headline with transformers' best
path, named in the matching ``*_path`` key. Graphs compiled during timed rounds are counted
in ``recompiles_while_timed`` (none is the expected figure).

On CUDA it also measures copy bandwidth and reports the memory-bandwidth bound
(bandwidth / weight bytes). The last line printed is a JSON object with every figure.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import math
import os
import platform
import random
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from inference_demo.bench_transformers import (
    Arrival,
    HFPath,
    fixed_shape,
    hf_arrival_batches,
    hf_generate,
    hf_model,
    hf_paths,
)
from inference_demo.llama.engine import Engine, Request
from inference_demo.llama.generation import (
    DecodeFn,
    SamplingParams,
    compile_decode,
    decode_one_token,
    generate,
)
from inference_demo.llama.model import ModelArgs, Transformer
from inference_demo.llama.tokenizer import Tokenizer

DEMO_DIR = Path(__file__).resolve().parent / "demo_model"
RANDOM_CONFIGS = {"7b": "7B", "tiny": "tiny"}
CONCURRENT_PROMPTS = (4, 64)  # prompt lengths of the concurrent requests, inclusive
MIXED_WARM_TOKENS = 16  # deltas each running row streams before the long prompt arrives
CHUNK_IF_NO_DEFAULT = 256
Metrics = dict[str, float]


class SilentTokenizer:
    """Stands in for a tokenizer with a random model: ids in, one "." per token out
    (so that streams have deltas to time)."""

    def __init__(self, vocab_size: int) -> None:
        self.n_words, self.bos_id, self.eos_id, self.pad_id = vocab_size, 1, 2, -1

    def encode(self, s: str, *, bos: bool, eos: bool) -> list[int]:
        return [self.bos_id] * bos + [3 + b % (self.n_words - 3) for b in s.encode()]

    def decode(self, ids: list[int]) -> str:
        return "." * len(ids)


@dataclass
class Bench:
    """What every section needs."""

    model: Transformer
    tok: Any
    hf: Any
    device: torch.device
    opts: argparse.Namespace
    decodes: dict[str, DecodeFn]  # "eager", and "compiled" with --compile
    paths: list[HFPath]
    result: dict[str, Any]
    errors: dict[str, str] = field(default_factory=dict)
    recompiles: dict[str, int] = field(default_factory=dict)  # graphs compiled while timed

    @property
    def headline(self) -> str:
        return "compiled" if "compiled" in self.decodes else "eager"

    @property
    def theirs(self) -> list[HFPath]:
        return [p for p in self.paths if f"transformers_{p.key}" not in self.errors]


# Measurement helpers.


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], Any], runs: int, device: torch.device) -> float:
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(runs):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rounds(
    fns: dict[str, Callable[[], Metrics]],
    runs: int,
    errors: dict[str, str],
    recompiles: dict[str, int] | None = None,
    section: str = "",
) -> dict[str, Metrics]:
    """Call every function once per round, in turn, ``runs + 1`` times; medians per metric.

    The first round warms up (and compiles) and is dropped. A transformers path that raises
    is dropped for the rest of the bench, its error recorded under its key. Graphs compiled
    during the timed rounds (new shapes: their time is in the figure) are counted into
    ``recompiles`` under ``section/key``.
    """
    samples: dict[str, list[Metrics]] = {key: [] for key in fns}
    for i in range(runs + 1):
        for key, fn in fns.items():
            if key in errors:
                continue
            graphs = compiled_graphs()
            try:
                metrics = fn()
            except Exception as exc:
                if not key.startswith("transformers_"):
                    raise
                errors[key] = f"{type(exc).__name__}: {exc}"[:500]
                print(f"{key} failed, left out: {errors[key]}", flush=True)
                continue
            if i:
                samples[key].append(metrics)
                if recompiles is not None and compiled_graphs() > graphs:
                    name = f"{section}/{key}"
                    recompiles[name] = recompiles.get(name, 0) + compiled_graphs() - graphs
    return {
        key: {m: statistics.median(s[m] for s in got) for m in got[0]}
        for key, got in samples.items()
        if got and key not in errors
    }


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def prompt_ids(length: int, tok: Any, salt: int) -> list[int]:
    """A deterministic prompt of ``length`` ids (BOS first), never a special id."""
    span = tok.n_words - 3
    return [tok.bos_id, *(3 + (salt * 7919 + j * 104729) % span for j in range(length - 1))]


def concurrent_prompts(users: int, tok: Any) -> list[list[int]]:
    low, high = CONCURRENT_PROMPTS
    return [prompt_ids(low + (i * 37) % (high - low + 1), tok, salt=i) for i in range(users)]


def staggered_schedule(opts: argparse.Namespace, tok: Any) -> list[Arrival]:
    """Exponential inter-arrival gaps (fixed seed) scaled to span ``--stagger-seconds``."""
    rng = random.Random(opts.seed)
    gaps = [rng.expovariate(1.0) for _ in range(opts.stagger_requests - 1)]
    scale = opts.stagger_seconds / sum(gaps) if gaps else 0.0
    times = [0.0, *itertools.accumulate(g * scale for g in gaps)]
    return [
        Arrival(
            round(at, 4),
            prompt_ids(rng.randint(*opts.stagger_prompt), tok, salt=1000 + i),
            rng.randint(*opts.stagger_new),
        )
        for i, at in enumerate(times)
    ]


def arrival_metrics(schedule: Sequence[Arrival], finished: Sequence[float]) -> Metrics:
    latencies = [done - item.at_s for item, done in zip(schedule, finished, strict=True)]
    return {
        "makespan_s": max(finished) - schedule[0].at_s,
        "tail_s": max(finished) - schedule[-1].at_s,  # from the last arrival
        "mean_latency_s": statistics.fmean(latencies),
        "p50_latency_s": statistics.median(latencies),
        "max_latency_s": max(latencies),
    }


# Models.


def random_model(name: str, device: torch.device, dtype: torch.dtype, max_seq_len: int) -> Any:
    args = ModelArgs.from_name(name, max_seq_len=max_seq_len)
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to(dtype).to_empty(device=device)  # allocated once, in the final dtype
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval().requires_grad_(False), SilentTokenizer(args.vocab_size)


# Our side.


def ours_batch1(
    model: Transformer, tok: Any, prompt: list[int], n: int, decode: DecodeFn
) -> tuple[float, float]:
    """(tokens / whole call, as transformers is measured; tokens / s after the first)."""
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)
    t = generate(model, tok, prompt, params, decode=decode).collect().timings
    return t.generated_tokens / t.total_s, t.tokens_per_s


def engine_throughput(
    model: Transformer,
    tok: Any,
    prompts: Sequence[list[int]],
    n: int,
    decode: DecodeFn,
    max_seq_len: int,
) -> float:
    """Aggregate tokens/s of ``len(prompts)`` requests submitted at once."""
    users = len(prompts)
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)
    warm_up = SamplingParams(max_new_tokens=4, ignore_eos=True)
    with Engine(model, tok, max_batch_size=users, max_seq_len=max_seq_len, decode=decode) as e:
        for r in [e.submit(p, warm_up) for p in prompts]:
            r.result()
        start = time.perf_counter()
        requests = [e.submit(p, params) for p in prompts]
        total = sum(len(r.result().token_ids) for r in requests)
        return total / (time.perf_counter() - start)


def ours_staggered(
    model: Transformer, tok: Any, schedule: Sequence[Arrival], decode: DecodeFn, max_seq_len: int
) -> Metrics:
    """Submit each request at its arrival time; completion = submit + the request's total_s."""
    with Engine(
        model,
        tok,
        max_batch_size=len(schedule),
        max_queue=len(schedule),
        max_seq_len=max_seq_len,
        decode=decode,
    ) as engine:
        engine.submit(
            schedule[0].prompt, SamplingParams(max_new_tokens=2, ignore_eos=True)
        ).result()
        start = time.perf_counter()
        submitted: list[tuple[float, Request]] = []
        for item in schedule:
            delay = item.at_s - (time.perf_counter() - start)
            if delay > 0:
                time.sleep(delay)
            params = SamplingParams(max_new_tokens=item.new_tokens, ignore_eos=True)
            submitted.append((time.perf_counter() - start, engine.submit(item.prompt, params)))
        finished = [at + r.result().timings.total_s for at, r in submitted]
    return arrival_metrics(schedule, finished)


def _stamp(request: Request, stamps: list[float]) -> None:
    for _ in request:
        stamps.append(time.perf_counter())


def token_clock(submitted: float, request: Request, stamps: list[float]) -> list[float]:
    """When each token of a finished request was sampled, on the perf_counter clock.

    The engine's per-token times where the Completion has them (seconds since submit);
    otherwise the times its stream yielded deltas (one per token, except where the
    tokenizer holds back part of a character).
    """
    times = getattr(request.completion, "token_times", None)
    return [submitted + t for t in times] if times else stamps


def mixed_load(
    model: Transformer,
    tok: Any,
    decode: DecodeFn,
    *,
    rows: int,
    long_prompt: list[int],
    max_seq_len: int,
    engine_kwargs: dict[str, Any],
) -> Metrics:
    """Gaps between the running rows' tokens while a long prompt is admitted and prefilled.

    The window runs from the long prompt's submission to its first token; a gap counts when
    it overlaps the window. ``itl_p50_before_ms`` is the rows' median gap before it.
    """
    prompts = [prompt_ids(8 + (8 * i) % 57, tok, salt=500 + i) for i in range(rows)]
    with Engine(
        model, tok, max_batch_size=rows + 1, max_seq_len=max_seq_len, decode=decode, **engine_kwargs
    ) as engine:
        engine.submit(long_prompt, SamplingParams(max_new_tokens=2, ignore_eos=True)).result()
        stamps: list[list[float]] = [[] for _ in prompts]
        submitted: list[tuple[float, Request]] = []
        for p in prompts:  # they would run for the whole context: cancelled below
            params = SamplingParams(max_new_tokens=max_seq_len - len(p), ignore_eos=True)
            submitted.append((time.perf_counter(), engine.submit(p, params)))
        threads = [
            threading.Thread(target=_stamp, args=(r, s), daemon=True)
            for (_, r), s in zip(submitted, stamps, strict=True)
        ]
        for thread in threads:
            thread.start()
        deadline = time.perf_counter() + 120
        while min(len(s) for s in stamps) < MIXED_WARM_TOKENS:
            if time.perf_counter() > deadline:
                raise RuntimeError("the running rows did not start streaming")
            time.sleep(0.002)
        arrived = time.perf_counter()
        long = engine.submit(long_prompt, SamplingParams(max_new_tokens=4, ignore_eos=True))
        ttft = long.result().timings.ttft_s
        first_token = arrived + ttft
        for _, request in submitted:
            request.cancel()
        for thread in threads:
            thread.join(30)
    window, before = [], []
    for (at, request), s in zip(submitted, stamps, strict=True):
        for a, b in itertools.pairwise(token_clock(at, request, s)):
            if b > arrived and a < first_token:
                window.append(b - a)
            elif b <= arrived:
                before.append(b - a)
    if not window:
        raise RuntimeError("no running row decoded across the long prompt's prefill")
    return {
        "itl_p95_ms": percentile(window, 95) * 1000,
        "itl_max_ms": max(window) * 1000,
        "itl_p50_before_ms": statistics.median(before) * 1000,
        "long_ttft_ms": ttft * 1000,
    }


def prefill_modes(long_len: int, max_seq_len: int) -> list[tuple[str, dict[str, Any], int]]:
    """(name, Engine kwargs, chunk tokens): chunked and unchunked where the engine can chunk."""
    param = inspect.signature(Engine.__init__).parameters.get("prefill_chunk")
    if param is None:
        return [("unchunked", {}, long_len)]
    default = param.default
    valid = isinstance(default, int) and not isinstance(default, bool) and default > 0
    if valid and default < long_len:
        chunked: tuple[str, dict[str, Any], int] = ("chunked", {}, default)
    else:  # the engine's default would not split this prompt (small smoke-test sizes)
        chunk = CHUNK_IF_NO_DEFAULT if long_len > CHUNK_IF_NO_DEFAULT else max(1, long_len // 4)
        chunked = ("chunked", {"prefill_chunk": chunk}, chunk)
    # A chunk as long as the context is one piece, whatever the engine's sentinel for "off".
    return [chunked, ("unchunked", {"prefill_chunk": max_seq_len}, long_len)]


# Sections.


def best_of(scores: dict[str, float], keys: Sequence[str], lower_is_better: bool) -> str | None:
    present = [k for k in keys if k in scores]
    if not present:
        return None
    return (min if lower_is_better else max)(present, key=lambda k: scores[k])


def record_speedups(
    b: Bench, scores: dict[str, float], prefix: str, *, lower_is_better: bool = False
) -> None:
    """Like with like (eager, compiled) and ours (headline mode) against their best path."""
    theirs = [k for k in scores if k.startswith("transformers_")]
    pairs = {
        "eager_vs_eager": ("ours_eager", [k for k in theirs if "eager" in k]),
        "compiled_vs_compiled": ("ours_compiled", [k for k in theirs if "compiled" in k]),
        "vs_transformers": (f"ours_{b.headline}", theirs),
    }
    for name, (ours, candidates) in pairs.items():
        their = best_of(scores, candidates, lower_is_better)
        if ours not in scores or their is None:
            continue
        ratio = scores[their] / scores[ours] if lower_is_better else scores[ours] / scores[their]
        b.result[f"{prefix}speedup_{name}"] = round(ratio, 2)
        b.result[f"{prefix}speedup_{name}_path"] = their.removeprefix("transformers_")


def interleaved(
    ours: dict[str, Callable[[], Metrics]], theirs: dict[str, Callable[[], Metrics]]
) -> dict[str, Callable[[], Metrics]]:
    order: dict[str, Callable[[], Metrics]] = {}
    for pair in itertools.zip_longest(ours.items(), theirs.items()):
        order.update(item for item in pair if item is not None)
    return order


def section_batch1(b: Bench, prompt: list[int], max_seq_len: int) -> None:
    n, device = b.opts.new_tokens, b.device
    b.model.setup_caches(1, max_seq_len)
    ours = {
        f"ours_{mode}": lambda d=decode: dict(
            zip(("tok_s", "decode_tok_s"), ours_batch1(b.model, b.tok, prompt, n, d), strict=True)
        )
        for mode, decode in b.decodes.items()
    }
    theirs = {
        f"transformers_{p.key}": lambda p=p: {
            "tok_s": n / hf_generate(b.hf, [prompt], n, device, p)
        }
        for p in b.theirs
    }
    medians = rounds(interleaved(ours, theirs), b.opts.runs, b.errors, b.recompiles, "batch1")
    scores = {key: m["tok_s"] for key, m in medians.items()}
    for key, m in medians.items():
        b.result[f"{key}_batch1_tok_s"] = round(m["tok_s"], 1)
        if "decode_tok_s" in m:
            b.result[f"{key}_batch1_decode_tok_s"] = round(m["decode_tok_s"], 1)
        print(f"batch 1, {key:32s} {m['tok_s']:9.1f} tok/s", flush=True)
    headline = medians[f"ours_{b.headline}"]
    b.result["ours_batch1_tok_s"] = round(headline["tok_s"], 1)
    b.result["ours_batch1_decode_tok_s"] = round(headline["decode_tok_s"], 1)
    record_speedups(b, scores, "")
    if "speedup_vs_transformers_path" in b.result:
        their = b.result["speedup_vs_transformers_path"]
        b.result["transformers_best_path"] = their
        b.result["transformers_tok_s"] = b.result[f"transformers_{their}_batch1_tok_s"]
        print(
            f"batch 1: ours ({b.headline}) {b.result['speedup_vs_transformers']}x transformers' "
            f"best ({their}); eager vs eager {b.result.get('speedup_eager_vs_eager', '-')}x, "
            f"compiled vs compiled {b.result.get('speedup_compiled_vs_compiled', '-')}x",
            flush=True,
        )


def section_ttft(b: Bench, max_seq_len: int) -> None:
    length = b.opts.prompt_tokens
    b.model.setup_caches(1, max_seq_len)
    prompt = prompt_ids(length, b.tok, salt=7)
    one = SamplingParams(max_new_tokens=1, ignore_eos=True)

    def ours() -> Metrics:
        sync(b.device)
        return {"s": generate(b.model, b.tok, prompt, one).collect().timings.total_s}

    fns: dict[str, Callable[[], Metrics]] = {"ours": ours}
    eager = [p for p in b.theirs if p.key == "eager_dynamic"]
    if eager:
        fns["transformers_ttft"] = lambda: {"s": hf_generate(b.hf, [prompt], 1, b.device, eager[0])}
    medians = rounds(fns, b.opts.runs, b.errors, b.recompiles, "ttft")
    b.result[f"ttft_{length}_ms"] = round(medians["ours"]["s"] * 1000, 1)
    line = f"time to first token, {length}-token prompt: ours {medians['ours']['s'] * 1000:.1f} ms"
    if "transformers_ttft" in medians:
        b.result[f"transformers_ttft_{length}_ms"] = round(
            medians["transformers_ttft"]["s"] * 1000, 1
        )
        line += f", transformers (eager_dynamic) {medians['transformers_ttft']['s'] * 1000:.1f} ms"
    print(line, flush=True)


def section_concurrent(b: Bench, max_seq_len: int) -> dict[str, float]:
    """Returns the last (largest) user count's tokens/s per path."""
    n, scores = b.opts.new_tokens, {}
    for users in b.opts.users:
        prompts = concurrent_prompts(users, b.tok)
        ours = {
            f"ours_{mode}": lambda d=decode, prompts=prompts: {
                "tok_s": engine_throughput(b.model, b.tok, prompts, n, d, max_seq_len)
            }
            for mode, decode in b.decodes.items()
        }
        theirs = {
            f"transformers_{p.key}": lambda p=p, prompts=prompts: {
                "tok_s": len(prompts) * n / hf_generate(b.hf, prompts, n, b.device, p)
            }
            for p in b.theirs
        }
        section = f"{users}_users"
        medians = rounds(interleaved(ours, theirs), b.opts.runs, b.errors, b.recompiles, section)
        scores = {key: m["tok_s"] for key, m in medians.items()}
        for key, rate in scores.items():
            b.result[f"{key}_{users}_users_tok_s"] = round(rate, 1)
            print(f"{users:2d} concurrent, {key:30s} {rate:9.1f} tok/s in all", flush=True)
        b.result[f"engine_{users}_users_tok_s"] = round(scores[f"ours_{b.headline}"], 1)
        record_speedups(b, scores, f"users_{users}_")
    return scores


def section_staggered(b: Bench, max_seq_len: int, their_keys: Sequence[str]) -> None:
    schedule = staggered_schedule(b.opts, b.tok)
    b.result["staggered_schedule"] = {
        "requests": len(schedule),
        "last_arrival_s": schedule[-1].at_s,
        "prompt_tokens": [len(item.prompt) for item in schedule],
        "new_tokens": [item.new_tokens for item in schedule],
        "arrivals_s": [item.at_s for item in schedule],
    }
    ours = {
        f"ours_{mode}": lambda d=decode: ours_staggered(b.model, b.tok, schedule, d, max_seq_len)
        for mode, decode in b.decodes.items()
    }
    batch_sizes: dict[str, list[int]] = {}

    def theirs_run(path: HFPath) -> Metrics:
        finished, sizes = hf_arrival_batches(b.hf, schedule, b.device, path)
        batch_sizes[path.key] = sizes
        return {**arrival_metrics(schedule, finished), "batches": float(len(sizes))}

    cache_len = max(len(a.prompt) for a in schedule) + max(a.new_tokens for a in schedule)
    paths = [
        fixed_shape(b.hf, p, len(schedule), cache_len) if p.compiled else p
        for p in b.theirs
        if p.key in their_keys
    ]
    b.result["labels"].update({f"transformers_{p.key}": p.label for p in paths})
    theirs = {f"transformers_{p.key}": lambda p=p: theirs_run(p) for p in paths}
    medians = rounds(interleaved(ours, theirs), b.opts.runs, b.errors, b.recompiles, "staggered")
    for key, m in medians.items():
        for metric, value in m.items():
            b.result[f"{key}_staggered_{metric}"] = round(value, 3)
        print(
            f"staggered, {key:34s} makespan {m['makespan_s']:6.2f} s (last done "
            f"{m['tail_s']:5.2f} s after the last arrival), latency mean "
            f"{m['mean_latency_s']:5.2f} s, p50 {m['p50_latency_s']:5.2f} s",
            flush=True,
        )
        if b.recompiles.get(f"staggered/{key}"):
            print(f"  ({b.recompiles[f'staggered/{key}']} graphs compiled while timed)")
    for key, sizes in batch_sizes.items():
        b.result[f"transformers_{key}_staggered_batch_sizes"] = sizes  # of the last run
    for metric, prefix in (
        ("makespan_s", "staggered_makespan_"),
        ("mean_latency_s", "staggered_latency_"),
    ):
        record_speedups(b, {k: m[metric] for k, m in medians.items()}, prefix, lower_is_better=True)


def section_mixed(b: Bench, max_seq_len: int) -> None:
    long_len, rows = b.opts.long_prompt_tokens, b.opts.mixed_rows
    long_prompt = prompt_ids(long_len, b.tok, salt=9)
    decode = b.decodes[b.headline]
    modes = prefill_modes(long_len, max_seq_len)
    b.result["mixed_rows"] = rows
    b.result["mixed_long_prompt_tokens"] = long_len
    b.result["mixed_prefill_chunk_supported"] = modes[0][0] == "chunked"
    fns: dict[str, Callable[[], Metrics]] = {}
    for name, kwargs, chunk in modes:
        if name == "chunked":
            b.result["mixed_prefill_chunk_tokens"] = chunk
        fns[f"mixed_{name}"] = lambda kw=kwargs: mixed_load(
            b.model,
            b.tok,
            decode,
            rows=rows,
            long_prompt=long_prompt,
            max_seq_len=max_seq_len,
            engine_kwargs=kw,
        )
    for key, m in rounds(fns, b.opts.runs, b.errors, b.recompiles, "mixed").items():
        for metric, value in m.items():
            b.result[f"{key}_{metric}"] = round(value, 1)
        print(
            f"mixed load ({key.removeprefix('mixed_')} prefill, {rows} rows + a {long_len}-token "
            f"prompt): gaps p95 {m['itl_p95_ms']:.1f} ms, max {m['itl_max_ms']:.1f} ms "
            f"(p50 before it {m['itl_p50_before_ms']:.1f} ms); its TTFT {m['long_ttft_ms']:.1f} ms",
            flush=True,
        )


def labels(b: Bench) -> dict[str, str]:
    cuda = b.device.type == "cuda"
    out = {
        "ours_eager": "our engine, eager decode step",
        "ours_compiled": "our engine, decode step under torch.compile(fullgraph=True, "
        + ("dynamic=False, mode='reduce-overhead')" if cuda else "dynamic=False, cpp_wrapper)"),
        "headline": f"ours_{b.headline}: ours_batch1_tok_s, engine_*_users_tok_s, mixed_*",
    }
    out.update({f"transformers_{p.key}": p.label for p in b.paths})
    return {k: v for k, v in out.items() if k != "ours_compiled" or "compiled" in b.decodes}


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = median_time(lambda: dst.copy_(src), 10, device)
    return 2 * nbytes / seconds  # read + write


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--config", default="demo", choices=["demo", *RANDOM_CONFIGS])
    parser.add_argument(
        "--gpu", action="store_true", help="shorthand for --device cuda --config 7b"
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=512, help="for time to first token")
    parser.add_argument("--users", type=int, nargs="*", default=[8, 16])
    parser.add_argument("--stagger-requests", type=int, default=16, help="0: no staggered run")
    parser.add_argument("--stagger-seconds", type=float, default=3.0)
    parser.add_argument(
        "--stagger-prompt", type=int, nargs=2, default=[8, 300], metavar=("MIN", "MAX")
    )
    parser.add_argument(
        "--stagger-new", type=int, nargs=2, default=[16, 128], metavar=("MIN", "MAX")
    )
    parser.add_argument("--long-prompt-tokens", type=int, default=2000, help="0: no mixed load")
    parser.add_argument("--mixed-rows", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default 1 on the CPU: steady on a shared machine; 0: torch's)",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure compiled paths, ours and transformers' (--no-compile: eager only)",
    )
    parser.add_argument("--no-transformers", action="store_true")
    opts = parser.parse_args(argv)
    if opts.gpu:
        opts.device, opts.config = "cuda", "7b"
    return opts


def main(argv: list[str] | None = None) -> dict[str, Any]:
    opts = parse_args(argv)
    if not opts.compile:
        return run(opts)
    # Every shape compiles once; never fall back to eager under a "compiled" label.
    limit = max(torch._dynamo.config.recompile_limit, 64)
    with torch._dynamo.config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True):
        return run(opts)


def run(opts: argparse.Namespace) -> dict[str, Any]:
    began = time.perf_counter()
    device = torch.device(opts.device)
    cuda = device.type == "cuda"
    threads = opts.threads if opts.threads is not None else (0 if cuda else 1)
    if threads:
        torch.set_num_threads(threads)
    dtype = torch.bfloat16 if cuda else torch.float32
    decode_len = round_up(CONCURRENT_PROMPTS[1] + opts.new_tokens + 1)  # caches fit the work
    ttft_len = round_up(opts.prompt_tokens + 1)
    stagger_len = round_up(opts.stagger_prompt[1] + opts.stagger_new[1] + 1)
    mixed_len = round_up(opts.long_prompt_tokens + 8)
    lengths = [decode_len, ttft_len]
    lengths += [stagger_len] * (opts.stagger_requests > 0) + [mixed_len] * (
        opts.long_prompt_tokens > 0
    )
    max_len = max(lengths)

    if opts.config == "demo":
        from inference_demo.llama.checkpoint import load_model

        model = load_model(DEMO_DIR, device=device, dtype=dtype, max_seq_len=max_len)
        tok: Any = Tokenizer(DEMO_DIR / "tokenizer.model")
    else:
        model, tok = random_model(RANDOM_CONFIGS[opts.config], device, dtype, max_len)
    decodes: dict[str, DecodeFn] = {"eager": decode_one_token}
    if opts.compile:
        decodes["compiled"] = compile_decode(device)
    hf, paths = None, []
    if not opts.no_transformers:
        import transformers

        release = DEMO_DIR if opts.config == "demo" else None
        hf, paths = hf_model(model, release, device, dtype), hf_paths(device, compile=opts.compile)
    # Bytes a decode step must read: every weight except the embedding (one row of it).
    weight_bytes = sum(
        p.numel() * p.element_size()
        for name, p in model.named_parameters()
        if not name.startswith("tok_embeddings")
    )
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": torch.cuda.get_device_name(device) if cuda else cpu_name(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": None if hf is None else transformers.__version__,
        "load_avg_start": load_average(),
        "config": opts.config,
        "dtype": str(dtype).removeprefix("torch."),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "new_tokens": opts.new_tokens,
        "runs": opts.runs,
        "compiled": opts.compile,
    }
    b = Bench(model, tok, hf, device, opts, decodes, paths, result)
    result["labels"] = labels(b)
    print(
        f"{result['device']}, {result['threads']} thread(s), torch {result['torch']}, "
        f"transformers {result['transformers']}, load {result['load_avg_start']}",
        flush=True,
    )

    section_batch1(b, tok.encode("The for statement", bos=True, eos=False), decode_len)
    section_ttft(b, ttft_len)
    scores = section_concurrent(b, decode_len)
    if opts.stagger_requests > 0:
        # Every eager path, and the compiled one if it was their best batched path.
        keep = {p.key for p in b.theirs if not p.compiled}
        rates = {p.key: scores[k] for p in b.theirs if (k := f"transformers_{p.key}") in scores}
        if rates:
            keep.add(max(rates, key=rates.__getitem__))
        section_staggered(b, stagger_len, sorted(keep))
    if opts.long_prompt_tokens > 0:
        section_mixed(b, mixed_len)

    if cuda:
        bandwidth = copy_bandwidth(device)
        bound = bandwidth / weight_bytes
        result["copy_bandwidth_gb_s"] = round(bandwidth / 1e9, 1)
        result["bandwidth_bound_tok_s"] = round(bound, 1)
        result["fraction_of_bound"] = round(result["ours_batch1_decode_tok_s"] / bound, 3)
        print(f"bandwidth bound {bound:.1f} tok/s; ours at {result['fraction_of_bound']:.0%}")
    for key, error in b.errors.items():
        result[f"{key}_error"] = error
    result["recompiles_while_timed"] = b.recompiles
    result["load_avg_end"] = load_average()
    result["bench_s"] = round(time.perf_counter() - began, 1)
    print(json.dumps(result))
    return result


def round_up(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


def cpu_name() -> str:
    for line in (
        Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    ):
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return platform.processor() or "cpu"


if __name__ == "__main__":
    main()
