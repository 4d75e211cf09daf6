"""Throughput of a fingerprinted weight file next to the plain one:
`python -m weights.fingerprint.throughput_bench [--size-mb 512] [--runs 3] [--dir /tmp]`.

Writes a random bf16 ``consolidated.01.pth`` of LLaMA-7B-shaped tensors (about --size-mb
MB), warms the page cache, and measures, in MB/s (10**6 bytes per second), medians of
--runs passes over the whole file:

- plain: the file read in 4 MiB and in 1 MiB chunks (the portal's chunk) into bytes;
- fingerprinted: ``FingerprintedReader`` streaming the recipient's copy in 4 MiB chunks,
  with the file taken as shard 1 of 2 (wo, w2 and the embedding split by columns, so their
  rows map to merged coordinates one by one, as q/k rows of the transformers variant do)
  and as a single shard (every tensor one contiguous run); with torch limited to one
  thread and at its default (the engine is numpy, which runs these operations on one
  thread either way);
- ``fingerprint_range`` on 1 MiB reads with ``read_at`` (what a file-like handle serving the
  portal's 1 MiB chunks does);
- transform only: the same, the original bytes already in memory.

The portal serves a file at a rate of its own (HTTP, accounting); ``--portal-mb-s`` (the
plain rate through it, measured by ``python -m weights.bench``) turns the figures into the
expected fingerprinted/plain ratio through the portal, where the reader's cost replaces
the plain read's, per byte (`python -m weights.bench --only fingerprinted` measures the
real ratio through the portal, docs/benchmarks.md). Medians and bests of interleaved rounds: on a shared machine
the best is the figure least disturbed by others' load.
The file is deleted afterwards. Prints the figures; the last line is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from weights.fingerprint.embed import CHUNK, FingerprintedReader, fingerprint_range, transform
from weights.fingerprint.keys import recipient_code
from weights.fingerprint.layout import FileLayout, meta_layout

DIM, HIDDEN, VOCAB = 4096, 11008, 32000
KEY = bytes(range(32))
# Measured by `python -m weights.bench` (docs/benchmarks_weights.md): plain download rate.
PORTAL_MB_S = 1714.0


def llama_shapes() -> Iterator[tuple[str, tuple[int, ...]]]:
    """LLaMA-7B's tensors as shard 1 of 2 holds them (column- and row-split halves)."""
    yield "tok_embeddings.weight", (VOCAB, DIM // 2)
    for i in range(32):
        p = f"layers.{i}."
        for name in ("wq", "wk", "wv"):
            yield f"{p}attention.{name}.weight", (DIM // 2, DIM)
        yield f"{p}attention.wo.weight", (DIM, DIM // 2)
        yield f"{p}feed_forward.w1.weight", (HIDDEN // 2, DIM)
        yield f"{p}feed_forward.w2.weight", (DIM, HIDDEN // 2)
        yield f"{p}feed_forward.w3.weight", (HIDDEN // 2, DIM)
        yield f"{p}attention_norm.weight", (DIM,)
        yield f"{p}ffn_norm.weight", (DIM,)


def write_file(path: Path, size_mb: int) -> None:
    gen = torch.Generator().manual_seed(0)
    state, total = {}, 0
    for name, shape in llama_shapes():
        if total >= size_mb * 10**6:
            break
        state[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        total += state[name].nbytes
    state["norm.weight"] = torch.ones(DIM, dtype=torch.bfloat16)
    torch.save(state, path)


def measure(passes: dict[str, Callable[[], int]], runs: int) -> dict[str, list[float]]:
    """MB/s of each pass, ``runs`` rounds, the passes interleaved within a round so that
    load from elsewhere on the machine falls on all of them alike."""
    speeds: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(runs):
        for name, run in passes.items():
            t0 = time.perf_counter()
            n = run()
            speeds[name].append(n / (time.perf_counter() - t0) / 1e6)
    return speeds


def plain(path: Path, chunk: int) -> Callable[[], int]:
    def run() -> int:
        n = 0
        with path.open("rb", buffering=0) as f:
            while block := f.read(chunk):
                n += len(block)
        return n

    return run


def streamed(path: Path, layout: FileLayout, code: bytes) -> Callable[[], int]:
    reader = FingerprintedReader(path, layout, KEY, code)
    return lambda: sum(len(c) for c in reader.iter_range(0, reader.size))


def ranges(path: Path, layout: FileLayout, code: bytes, chunk: int) -> Callable[[], int]:
    """``fingerprint_range`` on ``chunk``-sized reads, as a file-like handle serves them."""

    def run() -> int:
        fd = os.open(path, os.O_RDONLY)
        try:

            def read_at(a: int, b: int) -> bytes:
                return os.pread(fd, b - a, a)

            n = 0
            for a in range(0, layout.size, chunk):
                b = min(a + chunk, layout.size)
                n += len(fingerprint_range(layout, KEY, code, a, b, read_at(a, b), read_at=read_at))
            return n
        finally:
            os.close(fd)

    return run


def in_memory(data: bytes, layout: FileLayout, code: bytes) -> Callable[[], int]:
    def run() -> int:
        for a in range(0, len(data), CHUNK):  # 4 MiB chunks start on element boundaries
            buf = bytearray(memoryview(data)[a : a + CHUNK])
            transform(layout, KEY, code, a, buf)
            bytes(buf)
        return len(data)

    return run


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--portal-mb-s", type=float, default=PORTAL_MB_S)
    opts = parser.parse_args(argv)
    code = recipient_code(KEY, 1)
    with tempfile.TemporaryDirectory(dir=opts.dir) as tmp:
        path = Path(tmp) / "consolidated.01.pth"
        write_file(path, opts.size_mb)
        size = path.stat().st_size
        sharded = meta_layout(path, n_shards=2)
        single = meta_layout(path, shard_index=0, n_shards=1)
        plain(path, CHUNK)()  # warm the page cache
        default_threads = torch.get_num_threads()
        data = path.read_bytes()
        passes = {
            "plain_4mib": plain(path, CHUNK),
            "plain_1mib": plain(path, 1 << 20),
            "fp_sharded": streamed(path, sharded, code),
            "fp_single": streamed(path, single, code),
            "fp_range_1mib": ranges(path, sharded, code, 1 << 20),
            "transform_only": in_memory(data, sharded, code),
        }
        torch.set_num_threads(1)
        speeds = measure(passes, opts.runs)
        torch.set_num_threads(default_threads)
        speeds["fp_sharded_torch_default_threads"] = measure(
            {"fp": passes["fp_sharded"]}, opts.runs
        )["fp"]
        del data, passes
    out: dict[str, float] = {"file_mb": size / 1e6, "torch_default_threads": default_threads}
    for name, values in speeds.items():
        out[f"{name}_mb_s"] = statistics.median(values)
        out[f"{name}_best_mb_s"] = max(values)
    ratios = [f / p for f, p in zip(speeds["fp_sharded"], speeds["plain_4mib"], strict=True)]
    out["ratio_fp_to_plain_read"] = statistics.median(ratios)
    # Through the portal, serving a fingerprinted file swaps its plain read for the reader:
    # per byte, 1/portal becomes 1/portal - 1/plain + 1/fingerprinted.
    portal = opts.portal_mb_s
    out["portal_plain_mb_s_assumed"] = portal
    for suffix in ("", "_best"):
        extra = 1 / out[f"fp_sharded{suffix}_mb_s"] - 1 / out[f"plain_4mib{suffix}_mb_s"]
        out[f"portal_ratio_estimate{suffix}"] = (1 / portal) / (1 / portal + extra)
    for key, value in out.items():
        print(f"{key:40s} {value:10.3f}")
    print(json.dumps({k: round(v, 3) for k, v in out.items()}))
    return out


if __name__ == "__main__":
    main()
