"""Checkpoint load benchmark: peak host memory and time of `load_model` against the model's size.

    python -m inference_demo.load_bench                      # ~2 GB bf16 checkpoint, 2 shards
    python -m inference_demo.load_bench --gb 4 --shards 4 --dtype bfloat16
    python -m inference_demo.load_bench --gb 0.05            # smoke test

Writes a random LLaMA-shaped checkpoint in bfloat16 (as Meta's releases are stored), split
model-parallel into ``--shards`` files, then loads it on the CPU in a fresh subprocess per
(path, dtype): ``after`` is `load_model`; ``before`` is the torch.cat merge that `load_model`
used before it filled preallocated tensors shard by shard, kept here only as the reference.
Peak RSS is the child's VmHWM (anonymous and file-backed pages alike); growth is VmHWM minus
the RSS just before the load. Shards are read from the page cache (the writer just wrote them).
Also times the checklist pass once cold and once against the verify-once cache. The last line
is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from inference_demo.llama import checkpoint as ckpt
from inference_demo.llama.model import ModelArgs, Transformer

MODES = ("before", "after")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
STORED = torch.bfloat16
BASE = dict(dim=2048, n_heads=16, n_kv_heads=16, vocab_size=32000, multiple_of=256, norm_eps=1e-5)


def params_for(nbytes: float) -> dict[str, Any]:
    """LLaMA-shaped params (dim 2048, 32k vocabulary) with as many layers as fit in `nbytes`."""
    args = ModelArgs.from_params({**BASE, "n_layers": 1})
    per_layer = 4 * args.dim * args.dim + 3 * args.dim * args.hidden_dim + 2 * args.dim
    fixed = 2 * args.vocab_size * args.dim + args.dim
    layers = max(1, round((nbytes / STORED.itemsize - fixed) / per_layer))
    return {**BASE, "n_layers": layers}


def write_random_checkpoint(directory: Path, params: dict[str, Any], n_shards: int) -> int:
    """One shard in memory at a time; returns the model's parameter count."""
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_params(params))
    shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ckpt.PARAMS).write_text(json.dumps(params) + "\n")
    gen = torch.Generator().manual_seed(0)
    names = [ckpt.PARAMS]
    for i in range(n_shards):
        shard = {}
        for key, shape in shapes.items():
            axis = ckpt.split_dim(key)
            part = list(shape)
            if axis is not None:
                part[axis] //= n_shards
            shard[key] = torch.empty(part, dtype=STORED).normal_(0, 0.02, generator=gen)
        name = f"consolidated.{i:02d}.pth"
        torch.save(shard, directory / name)
        names.append(name)
        del shard
    ckpt.write_checklist(directory, names)
    return sum(torch.Size(s).numel() for s in shapes.values())


def cat_load(directory: Path, dtype: torch.dtype) -> Transformer:
    """REFERENCE ONLY: the pre-issue-13 loader (whole-tensor torch.cat, then a dtype cast)."""
    params = ckpt.read_params(directory)
    shards = [ckpt.load_shard(p) for p in ckpt.shard_paths(directory)]
    merged = {}
    for key in shards[0]:
        parts = [shard[key] for shard in shards]
        axis, _ = ckpt._merged_shape(key, parts, params["dim"])
        merged[key] = parts[0] if axis is None else torch.cat(parts, dim=axis)
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_params(params))
    model.load_state_dict(merged, assign=True)
    return model.to(dtype=dtype).eval().requires_grad_(False)


def vm(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1)) * 1024


def child(mode: str, directory: Path, dtype_name: str) -> None:
    dtype = DTYPES[dtype_name]
    rss_before = vm("VmRSS")
    start = time.perf_counter()
    if mode == "after":
        model = ckpt.load_model(directory, dtype=dtype, verify=False)
    else:
        model = cat_load(directory, dtype)
    seconds = time.perf_counter() - start
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert all(p.dtype == dtype for p in model.parameters())
    out = {"rss_before": rss_before, "peak_rss": vm("VmHWM"), "seconds": seconds}
    print(json.dumps({**out, "model_bytes": model_bytes}))


def measure(mode: str, directory: Path, dtype_name: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "inference_demo.load_bench", "--child", mode, str(directory)]
    done = subprocess.run(  # noqa: S603 (our own interpreter and module)
        [*cmd, "--dtype", dtype_name], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="checkpoint size (default 2)")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument(
        "--dtype", nargs="+", choices=sorted(DTYPES), default=["bfloat16", "float32"]
    )
    parser.add_argument("--dir", type=Path, help="where to write it (default: a temp dir)")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.child:
        child(opts.child[0], Path(opts.child[1]), opts.dtype[0])
        return {}

    directory = opts.dir or Path(tempfile.mkdtemp(prefix="load-bench-"))
    try:
        params = params_for(opts.gb * 1e9)
        start = time.perf_counter()
        n_params = write_random_checkpoint(directory, params, opts.shards)
        write_s = time.perf_counter() - start
        files = sum(p.stat().st_size for p in directory.glob("consolidated.*.pth"))
        result: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__,
            "params": params,
            "params_m": round(n_params / 1e6, 1),
            "shards": opts.shards,
            "stored_dtype": "bfloat16",
            "checkpoint_bytes": files,
            "write_s": round(write_s, 1),
        }
        print(f"wrote {files / 1e9:.2f} GB in {opts.shards} shards ({n_params / 1e6:.0f}M params)")
        cache = directory / "verify-cache.json"
        for label in ("verify_cold_s", "verify_cached_s"):
            start = time.perf_counter()
            ckpt.verify_once(directory, cache=cache)
            result[label] = round(time.perf_counter() - start, 3)
        print(
            f"checklist: {result['verify_cold_s']:.2f} s cold, {result['verify_cached_s']:.3f} s cached"
        )
        for dtype_name in opts.dtype:
            for mode in MODES:
                m = measure(mode, directory, dtype_name)
                growth = m["peak_rss"] - m["rss_before"]
                row = {
                    "model_bytes": m["model_bytes"],
                    "peak_rss": m["peak_rss"],
                    "rss_growth": growth,
                    "growth_over_model": round(growth / m["model_bytes"], 2),
                    "seconds": round(m["seconds"], 2),
                }
                result[f"{mode}_{dtype_name}"] = row
                print(
                    f"{dtype_name:9s} {mode:6s}: model {m['model_bytes'] / 1e9:.2f} GB, "
                    f"peak RSS {m['peak_rss'] / 1e9:.2f} GB (+{growth / 1e9:.2f} GB, "
                    f"{row['growth_over_model']:.2f}x the model), {m['seconds']:.2f} s",
                    flush=True,
                )
    finally:
        if opts.dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
