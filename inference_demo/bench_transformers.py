"""transformers' side of the bench: our weights in ``LlamaForCausalLM`` and its ``generate()`` paths.

Three labelled paths, each the documented way for transformers 4.5x:

- ``eager_dynamic``: plain ``generate()`` (a ``DynamicCache`` that grows each step), eager;
- ``eager_static``: ``cache_implementation="static"`` (preallocated, fixed shapes), eager;
- ``compiled_static``: the static cache with ``generate()``'s own compilation of the decode
  forward (``compile_config=CompileConfig(...)``), the path transformers recommends for speed.

Every call asks for exactly ``n`` new tokens per row (``eos_token_id=None``: no stopping
criterion, no logits processor), greedy, batches left-padded with an attention mask.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from inference_demo.llama.model import Transformer

PAD_ID = 0  # masked out; any id in the vocabulary will do


@dataclass(frozen=True)
class HFPath:
    key: str  # eager_dynamic, eager_static, compiled_static
    label: str
    compiled: bool
    kwargs: dict[str, Any] = field(default_factory=dict)
    pad_to: int | None = None  # rows every batch is padded to (copies of its first prompt)


def compile_config(device: torch.device) -> Any:
    """The same compile settings as our decode step (``compile_decode``) on each device."""
    from transformers import CompileConfig

    if device.type == "cuda":  # CUDA graphs; generate() compiles on CUDA by itself
        return CompileConfig(fullgraph=True, dynamic=False, mode="reduce-overhead")
    config = CompileConfig(fullgraph=True, dynamic=False, mode=None, options={"cpp_wrapper": True})
    # generate() compiles only on CUDA unless this flag is set (transformers' own switch).
    config._compile_all_devices = True
    return config


def hf_paths(device: torch.device, *, compile: bool) -> list[HFPath]:
    paths = [
        HFPath("eager_dynamic", "generate(), dynamic cache (the default), eager", False),
        HFPath(
            "eager_static",
            'generate(cache_implementation="static"), eager',
            False,
            # On CUDA generate() would compile a static-cache forward by itself.
            {"cache_implementation": "static", "disable_compile": True},
        ),
    ]
    if compile:
        options = "reduce-overhead" if device.type == "cuda" else "cpp_wrapper"
        paths.append(
            HFPath(
                "compiled_static",
                'generate(cache_implementation="static", compile_config=CompileConfig('
                f"fullgraph=True, dynamic=False, {options})): decode forward compiled",
                True,
                {"cache_implementation": "static", "compile_config": compile_config(device)},
            )
        )
    return paths


def fixed_shape(hf: Any, path: HFPath, rows: int, max_cache_len: int) -> HFPath:
    """``path`` with its own static cache of one shape, every batch padded to ``rows``.

    generate() makes a new static cache whenever the batch size changes, and a compiled
    forward recompiles for each new shape; batches of varying size (arrival-order batching)
    would compile in the middle of the work. Like our engine's fixed batch of slots, one
    padded shape compiles once.
    """
    from transformers import StaticCache

    cache = StaticCache(config=hf.config, max_cache_len=max_cache_len)
    kwargs = {k: v for k, v in path.kwargs.items() if k != "cache_implementation"}
    return HFPath(
        f"{path.key}_padded",
        f"{path.label}; every batch padded to {rows} rows, one {max_cache_len}-position cache",
        path.compiled,
        {**kwargs, "past_key_values": cache},
        pad_to=rows,
    )


def hf_model(
    model: Transformer, release: Path | None, device: torch.device, dtype: torch.dtype
) -> Any:
    """The same weights in transformers' LlamaForCausalLM, mapped by our converter.

    With a ``release`` directory, the real road: convert it and load it with
    ``from_pretrained``; without (random weights), copy ``model``'s state dict across.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from inference_demo.convert import convert, hf_config, hf_state_dict

    if release is not None:
        out = Path(tempfile.mkdtemp(prefix="bench-hf-"))
        try:
            convert(release, out, dtype=dtype, max_seq_len=model.args.max_seq_len)
            hf = LlamaForCausalLM.from_pretrained(out, dtype=dtype)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        return hf.to(device).eval()
    config = LlamaConfig(**hf_config(model.args, dtype))
    with torch.device(device):  # a 7B copy is built in place, in its final dtype
        hf = LlamaForCausalLM._from_config(config, dtype=dtype)
    hf.load_state_dict(hf_state_dict(model.args, dict(model.state_dict())), strict=True)
    return hf.eval()


def left_pad(
    prompts: Sequence[list[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def hf_generate(
    hf: Any, prompts: Sequence[list[int]], n: int, device: torch.device, path: HFPath
) -> float:
    """Seconds for one ``generate()`` of ``n`` new tokens for every prompt, as one batch."""
    if path.pad_to is not None:
        if len(prompts) > path.pad_to:
            raise ValueError(f"{len(prompts)} prompts for a batch of {path.pad_to}")
        prompts = [*prompts, *[prompts[0]] * (path.pad_to - len(prompts))]
    ids, mask = left_pad(prompts, device)
    with torch.inference_mode():
        if path.pad_to is not None:  # its tensors were made in inference mode
            path.kwargs["past_key_values"].reset()
        _sync(device)
        start = time.perf_counter()
        out = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=PAD_ID,
            **path.kwargs,
        )
        _sync(device)
        elapsed = time.perf_counter() - start
    if tuple(out.shape) != (len(prompts), ids.shape[1] + n):
        raise RuntimeError(f"generate() returned {tuple(out.shape)}, expected {n} new tokens")
    return elapsed


@dataclass(frozen=True)
class Arrival:
    at_s: float  # since the start of the schedule
    prompt: list[int]
    new_tokens: int


def hf_arrival_batches(
    hf: Any, schedule: Sequence[Arrival], device: torch.device, path: HFPath
) -> tuple[list[float], list[int]]:
    """Serve a schedule without continuous batching, as well as ``generate()`` can.

    Whenever the model is idle, everything that has arrived so far becomes one left-padded
    batch run to the longest ``new_tokens`` in it; each request completes with its batch.
    Returns each request's completion time (seconds since the start) and the batch sizes.
    """
    start = time.perf_counter()
    finished = [0.0] * len(schedule)
    sizes: list[int] = []
    nxt = 0
    while nxt < len(schedule):
        now = time.perf_counter() - start
        if schedule[nxt].at_s > now:
            time.sleep(schedule[nxt].at_s - now)
            continue
        batch = [i for i in range(nxt, len(schedule)) if schedule[i].at_s <= now]
        nxt = batch[-1] + 1
        n = max(schedule[i].new_tokens for i in batch)
        hf_generate(hf, [schedule[i].prompt for i in batch], n, device, path)
        done = time.perf_counter() - start
        for i in batch:
            finished[i] = done
        sizes.append(len(batch))
    return finished, sizes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
