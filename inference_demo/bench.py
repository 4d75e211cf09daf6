"""Decode benchmark: our engine next to transformers on the same weights.

    python -m inference_demo.bench                  # CPU, the bundled demo model, compiled
    python -m inference_demo.bench --no-compile     # the same, eager (the CPU demo's default)
    python -m inference_demo.bench --gpu            # = --device cuda --config 7b
    python -m inference_demo.bench --config tiny --new-tokens 16 --no-compile  # smoke test

Prints batch-1 decode tokens/s (median of ``--runs``), aggregate tokens/s with 8 and
16 concurrent engine requests, time to first token for a 512-token prompt, and
transformers' ``generate()`` (on CUDA also with ``cache_implementation="static"``
and a compiled forward). On CUDA it measures copy bandwidth and reports the
memory-bandwidth bound (bandwidth / weight bytes). The last line is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from inference_demo.llama.engine import Engine
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


class SilentTokenizer:
    """Stands in for a tokenizer with a random model: ids in, no text out."""

    def __init__(self, vocab_size: int) -> None:
        self.n_words, self.bos_id, self.eos_id, self.pad_id = vocab_size, 1, 2, -1

    def encode(self, s: str, *, bos: bool, eos: bool) -> list[int]:
        return [self.bos_id] * bos + [3 + b % (self.n_words - 3) for b in s.encode()]

    def decode(self, ids: list[int]) -> str:
        return ""


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


def hf_model(model: Transformer, config_name: str, device: torch.device, dtype: torch.dtype) -> Any:
    """The same weights in transformers' LlamaForCausalLM, mapped by our converter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from inference_demo.convert import convert, hf_config, hf_state_dict

    if config_name == "demo":  # the real road: convert the release directory, load it
        out = Path(tempfile.mkdtemp(prefix="bench-hf-"))
        convert(DEMO_DIR, out, dtype=dtype, max_seq_len=model.args.max_seq_len)
        return LlamaForCausalLM.from_pretrained(out, torch_dtype=dtype).to(device).eval()
    config = LlamaConfig(**hf_config(model.args, dtype))
    with torch.device(device):  # a 7B copy is built in place, in its final dtype
        hf = LlamaForCausalLM._from_config(config, torch_dtype=dtype)
    hf.load_state_dict(hf_state_dict(model.args, dict(model.state_dict())), strict=True)
    return hf.eval()


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
    prompt: list[int],
    n: int,
    users: int,
    decode: DecodeFn,
    max_seq_len: int,
) -> float:
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)
    warm_up = SamplingParams(max_new_tokens=4, ignore_eos=True)
    with Engine(model, tok, max_batch_size=users, max_seq_len=max_seq_len, decode=decode) as e:
        for r in [e.submit(prompt, warm_up) for _ in range(users)]:
            r.result()
        start = time.perf_counter()
        requests = [e.submit(prompt, params) for _ in range(users)]
        total = sum(len(r.result().token_ids) for r in requests)
        return total / (time.perf_counter() - start)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = median_time(lambda: dst.copy_(src), 10, device)
    return 2 * nbytes / seconds  # read + write


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--config", default="demo", choices=["demo", *RANDOM_CONFIGS])
    parser.add_argument(
        "--gpu", action="store_true", help="shorthand for --device cuda --config 7b"
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=512, help="for time to first token")
    parser.add_argument("--users", type=int, nargs="+", default=[8, 16])
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default 1 on the CPU: steady on a shared machine; 0: torch's)",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="torch.compile our decode step (default: yes; --no-compile measures eager)",
    )
    parser.add_argument("--no-transformers", action="store_true")
    opts = parser.parse_args(argv)
    if opts.gpu:
        opts.device, opts.config = "cuda", "7b"
    device = torch.device(opts.device)
    cuda = device.type == "cuda"
    threads = opts.threads if opts.threads is not None else (0 if cuda else 1)
    if threads:
        torch.set_num_threads(threads)
    dtype = torch.bfloat16 if cuda else torch.float32
    compiled = opts.compile
    decode_len = round_up(32 + opts.new_tokens)  # caches sized to the workload
    ttft_len = round_up(opts.prompt_tokens + 1)

    if opts.config == "demo":
        from inference_demo.llama.checkpoint import load_model

        max_len = max(decode_len, ttft_len)
        model = load_model(DEMO_DIR, device=device, dtype=dtype, max_seq_len=max_len)
        tok: Any = Tokenizer(DEMO_DIR / "tokenizer.model")
    else:
        model, tok = random_model(
            RANDOM_CONFIGS[opts.config], device, dtype, max(decode_len, ttft_len)
        )
    decode: DecodeFn = compile_decode(device) if compiled else decode_one_token
    hf = None if opts.no_transformers else hf_model(model, opts.config, device, dtype)

    prompt = tok.encode("The for statement", bos=True, eos=False)
    # Bytes a decode step must read: every weight except the embedding (one row of it).
    weight_bytes = sum(
        p.numel() * p.element_size()
        for name, p in model.named_parameters()
        if not name.startswith("tok_embeddings")
    )
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(device) if cuda else cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "config": opts.config,
        "dtype": str(dtype).removeprefix("torch."),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "new_tokens": opts.new_tokens,
        "runs": opts.runs,
        "compiled": compiled,
    }

    # Batch 1, ours and transformers interleaved so that both see the same machine load.
    model.setup_caches(1, decode_len)
    ours, theirs = [], []
    for _ in range(opts.runs + 1):  # the first round warms up (and compiles)
        ours.append(ours_batch1(model, tok, prompt, opts.new_tokens, decode))
        if hf is not None:
            theirs.append(hf_generate(hf, prompt, opts.new_tokens, device))
    result["ours_batch1_tok_s"] = round(statistics.median(r[0] for r in ours[1:]), 1)
    result["ours_batch1_decode_tok_s"] = round(statistics.median(r[1] for r in ours[1:]), 1)
    print(f"ours, batch 1:               {result['ours_batch1_tok_s']:9.1f} tok/s", flush=True)
    if hf is not None:
        result["transformers_tok_s"] = round(statistics.median(theirs[1:]), 1)
        result["speedup_vs_transformers"] = round(
            result["ours_batch1_tok_s"] / result["transformers_tok_s"], 2
        )
        print(f"transformers generate():     {result['transformers_tok_s']:9.1f} tok/s")
        if cuda:
            hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)
            static = [
                hf_generate(hf, prompt, opts.new_tokens, device, cache_implementation="static")
                for _ in range(opts.runs + 1)
            ]
            result["transformers_static_compiled_tok_s"] = round(statistics.median(static[1:]), 1)
            print(
                f"transformers, static cache + compile: {statistics.median(static[1:]):.1f} tok/s"
            )
        del hf

    model.setup_caches(1, ttft_len)
    filler = torch.arange(opts.prompt_tokens - 1) * 7919 % (tok.n_words - 3) + 3
    long_prompt = [tok.bos_id, *filler.tolist()]
    one = SamplingParams(max_new_tokens=1, ignore_eos=True)
    ttft = median_time(lambda: generate(model, tok, long_prompt, one).collect(), opts.runs, device)
    result[f"ttft_{opts.prompt_tokens}_ms"] = round(ttft * 1000, 1)
    print(
        f"time to first token, {opts.prompt_tokens}-token prompt: {ttft * 1000:.1f} ms", flush=True
    )

    for users in opts.users:
        rate = engine_throughput(model, tok, prompt, opts.new_tokens, users, decode, decode_len)
        result[f"engine_{users}_users_tok_s"] = round(rate, 1)
        print(f"ours, {users:2d} concurrent requests: {rate:9.1f} tok/s in all", flush=True)

    if cuda:
        bandwidth = copy_bandwidth(device)
        bound = bandwidth / weight_bytes
        result["copy_bandwidth_gb_s"] = round(bandwidth / 1e9, 1)
        result["bandwidth_bound_tok_s"] = round(bound, 1)
        result["fraction_of_bound"] = round(result["ours_batch1_decode_tok_s"] / bound, 3)
        print(f"bandwidth bound {bound:.1f} tok/s; ours at {result['fraction_of_bound']:.0%}")
    print(json.dumps(result))
    return result


def round_up(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def cpu_name() -> str:
    for line in (
        Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    ):
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return platform.processor() or "cpu"


def hf_generate(hf: Any, prompt: list[int], n: int, device: torch.device, **extra: Any) -> float:
    ids = torch.tensor([prompt], device=device)
    with torch.inference_mode():
        sync(device)
        start = time.perf_counter()
        hf.generate(
            ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **extra
        )
        sync(device)
    return n / (time.perf_counter() - start)


if __name__ == "__main__":
    main()
