"""Fingerprint robustness and quality: `python -m weights.fingerprint_bench [--big-gb 2]`.

Two releases: the bundled demo model (bf16, 2 shards) and a random LLaMA-shaped checkpoint
of --big-gb GB (bf16, 2 shards, built under a temporary directory with
``save_checkpoint``). For each, recipients' copies are made (``fingerprint.perturb``) and
attacked; each attacked copy is traced (``fingerprint.trace``) against --candidates grants
(codes ``recipient_code(key, 1..N)``). An attack passes when every recipient whose copy
went into it is named with a corrected innocent-match probability below 1e-9 and no
innocent is named; a control (the original, an unrelated model) passes when nobody is.

Attacks: the exact copy, its last shard alone, the transformers conversion
(``inference_demo.convert``), casts to fp16 and fp32, round-to-nearest int8 per output
channel (dequantized, fp32), the average of 2 and of 3 recipients' copies (rounded to
bf16), and Gaussian noise of sigma = level * each tensor's std (rounded to bf16), raised
until detection fails. Quality (demo model): perplexity on held-out text (stdlib docstrings:
Python documentation the model never saw; this project's docs/*.md: another domain; and
the training text for reference) and greedy continuations of 20 prompts, original
next to a recipient's copy, through the project's own model and generation code.

Prints the figures; the last line is a JSON object. CPU heavy: about 10-15 minutes on
2 cores with the defaults, and ~5x --big-gb of free disk.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from inference_demo.convert import convert
from inference_demo.llama.checkpoint import (
    PARAMS,
    load_model,
    load_state_dict,
    open_checkpoint,
    save_checkpoint,
    shard_paths,
    split_state_dict,
    write_checklist,
)
from inference_demo.llama.engine import Engine
from inference_demo.llama.generation import SamplingParams
from inference_demo.llama.model import ModelArgs, Transformer
from inference_demo.llama.tokenizer import Tokenizer
from weights.fingerprint import trace as tr
from weights.fingerprint.keys import is_fingerprinted, recipient_code
from weights.fingerprint.perturb import write_recipient_copy

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "inference_demo" / "demo_model"
TOKENIZER = DEMO / "tokenizer.model"
KEY = hashlib.sha256(b"weights.fingerprint_bench release key").digest()
TARGET = 1e-9
NOISE_LEVELS = (0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0, 5.6)
# The big model's sweep, coarser (each level costs a trace of the whole model): below 0.5
# every level passes by thousands of orders of magnitude.
BIG_NOISE_LEVELS = (0.5, 1.0, 2.0, 2.8, 4.0, 5.6)
PROMPTS = (
    "The for statement is used to",
    "A function definition defines",
    "The import statement",
    "Exceptions are raised",
    "The with statement is used to",
    "Assignment statements are used to",
    "Comparisons can be chained",
    "The yield expression is used",
    "A class definition defines",
    "The Boolean operations",
    "Lambda expressions",
    "The global statement",
    "Integer literals are described",
    "The try statement specifies",
    "A slicing selects",
    "The return statement",
    "Coroutine function definition",
    "A dictionary display",
    "Deletion of a target list",
    "Augmented assignment is",
)
PERPLEXITY_WINDOW = 256
PERPLEXITY_MAX_TOKENS = 32_768
GREEDY_TOKENS = 64


def log(msg: str) -> None:
    print(msg, flush=True)


@contextlib.contextmanager
def timed(into: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    into[name] = round(time.perf_counter() - start, 2)


# --------------------------------------------------------------------------- checkpoints


def write_meta(
    directory: Path, params: dict[str, Any], tensors: Iterable[tuple[str, Tensor]], n: int
) -> Path:
    """A Meta-layout checkpoint from (name, merged tensor) pairs, split by the loader's rules
    one tensor at a time, so memory holds the shards once (``save_checkpoint`` holds the
    merged dict and its split copy together)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / PARAMS).write_text(json.dumps(params) + "\n")
    shards: list[dict[str, Tensor]] = [{} for _ in range(n)]
    for key, tensor in tensors:
        for shard, part in zip(shards, split_state_dict({key: tensor}, n), strict=True):
            shard[key] = part[key]
    names = []
    for i, shard in enumerate(shards):
        names.append(f"consolidated.{i:02d}.pth")
        torch.save(shard, directory / names[-1])
        shard.clear()
    write_checklist(directory, [PARAMS, *names])
    return directory


def read_params(directory: Path) -> dict[str, Any]:
    return json.loads((directory / PARAMS).read_text())


def merged(directory: Path) -> Iterator[tuple[str, Tensor]]:
    """A checkpoint's merged tensors, one at a time (memory-mapped shards)."""
    checkpoint = open_checkpoint(directory, verify=False)
    for key, sharded in checkpoint.tensors.items():
        yield key, tr.merge_tensor(sharded)


def big_params(gigabytes: float) -> dict[str, Any]:
    """A LLaMA-shaped config (dim 2048, 16 heads, 32,000 tokens) with as many layers as make
    about ``gigabytes`` GB of bf16."""
    base = dict(dim=2048, n_heads=16, vocab_size=32000, multiple_of=256, norm_eps=1e-6)
    args = ModelArgs.from_params({**base, "n_layers": 1})
    per_layer = 4 * args.dim * args.dim + 3 * args.dim * args.hidden_dim + 2 * args.dim
    fixed = 2 * args.vocab_size * args.dim + args.dim
    layers = max(1, round((gigabytes * 1e9 / 2 - fixed) / per_layer))
    return {**base, "n_layers": layers}


def random_tensors(params: dict[str, Any], seed: int) -> Iterator[tuple[str, Tensor]]:
    """Weights like a trained model's in scale (std 1/sqrt(fan-in), norms near 1), bf16."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_params(params))
    for key, t in model.state_dict().items():
        noise = torch.randn(t.shape, generator=gen)
        value = 1.0 + 0.1 * noise if t.ndim == 1 else noise.div_(t.shape[-1] ** 0.5)
        yield key, value.to(torch.bfloat16)


def build_big(directory: Path, gigabytes: float) -> Path:
    params = big_params(gigabytes)
    save_checkpoint(directory, params, dict(random_tensors(params, seed=1)), n_shards=2)
    shutil.copyfile(TOKENIZER, directory / "tokenizer.model")
    return directory


def n_shards(directory: Path) -> int:
    return len(shard_paths(directory))


# --------------------------------------------------------------------------- attacks


def cast(src: Path, dst: Path, dtype: torch.dtype) -> list[Path]:
    tensors = ((k, t.to(dtype)) for k, t in merged(src))
    return [write_meta(dst, read_params(src), tensors, n_shards(src))]


def int8_per_channel(w: Tensor) -> Tensor:
    """Round-to-nearest symmetric int8 per output channel (row), dequantized to fp32."""
    w = w.to(torch.float32)
    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / 127
    return torch.round(w / scale).clamp_(-127, 127).mul_(scale)


def quantize(src: Path, dst: Path) -> list[Path]:
    tensors = (
        (k, int8_per_channel(t) if t.ndim == 2 else t.to(torch.float32)) for k, t in merged(src)
    )
    return [write_meta(dst, read_params(src), tensors, n_shards(src))]


def average(sources: list[Path], dst: Path) -> list[Path]:
    """The colluders' mean, rounded back to the release's bf16."""
    streams = [merged(s) for s in sources]

    def tensors() -> Iterator[tuple[str, Tensor]]:
        for parts in zip(*streams, strict=True):
            total = sum(t.to(torch.float32) for _, t in parts)
            yield parts[0][0], (total / len(parts)).to(parts[0][1].dtype)

    return [write_meta(dst, read_params(sources[0]), tensors(), n_shards(sources[0]))]


def to_transformers(src: Path, dst: Path) -> list[Path]:
    convert(src, dst, tokenizer=TOKENIZER, verify=False)
    return [dst]


def noisy_state(src: Path, level: float, seed: int) -> dict[str, Tensor]:
    """The copy after Gaussian noise of sigma = level * std of each weight matrix, stored
    back in its dtype (as a fine-tuned copy would be)."""
    out = {}
    for key, t in merged(src):
        if not is_fingerprinted(key, tuple(t.shape)):
            continue
        # Seeded per tensor: the checkpoint's tensor order is a set's, so varies by run.
        digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        x = t.to(torch.float32)
        noise = torch.randn(x.shape, generator=gen).mul_(level * float(x.std()))
        out[key] = x.add_(noise).to(t.dtype)
    return out


# --------------------------------------------------------------------------- tracing


@dataclass
class Case:
    name: str
    original: Path
    work: Path
    marks: tr.ReleaseMarks
    candidates: dict[str, bytes]
    recipients: dict[int, Path]


def label(grant: int) -> str:
    return f"grant {grant}"


def outcome(
    result: tr.TraceResult, expected: list[int], seconds: float, extra: dict[str, Any]
) -> dict[str, Any]:
    want = {label(g) for g in expected}
    innocents = [c for c in result.candidates if c.label not in want]
    best = innocents[0] if innocents else None
    named_right = want <= set(result.named)
    row = {
        **extra,
        "expected": sorted(want),
        "named": result.named,
        "verdict": result.verdict,
        "reason": result.reason,
        "recipients": [
            {
                "label": c.label,
                "rank": result.rank(c.label),
                "score": round(c.score, 2),
                "log10_p_bound_corrected": round(c.log10_p_corrected, 1),
                "positions": c.positions,
                "stage": c.stage,
            }
            for c in (result.candidate(lbl) for lbl in sorted(want))
        ],
        "best_innocent": None
        if best is None
        else {
            "label": best.label,
            "score": round(best.score, 2),
            "p_bound": best.p_bound,
            "p_bound_corrected": best.p_corrected,
        },
        "closeness": {k: _round(v) for k, v in result.closeness.items()},
        "positions": result.positions,
        "pass": named_right and set(result.named) == want,
        "trace_s": round(seconds, 1),
    }
    return row


def _round(value: Any) -> Any:
    return float(f"{value:.4g}") if isinstance(value, float) else value


def run_trace(case: Case, suspect: tr.Suspect) -> tuple[tr.TraceResult, float]:
    start = time.perf_counter()
    result = tr.trace_suspect(suspect, case.marks, case.candidates)
    return result, time.perf_counter() - start


def trace_files(case: Case, name: str, paths: list[Path], expected: list[int]) -> dict[str, Any]:
    suspect = tr.open_suspect(paths, case.marks)
    result, seconds = run_trace(case, suspect)
    layouts = sorted({f.layout for f in result.suspect_files})
    size = sum(f.size for f in result.suspect_files)
    row = outcome(result, expected, seconds, {"attack": name, "layout": layouts, "bytes": size})
    print_row(row)
    return row


def print_row(row: dict[str, Any]) -> None:
    what = row.get("attack") or f"noise {row['level']}"
    status = "PASS" if row["pass"] else "FAIL"
    parts = [f"  {what:<24} {status}  named {row['named'] or '-'}"]
    for r in row["recipients"]:
        parts.append(f"{r['label']}: rank {r['rank']}, log10 p {r['log10_p_bound_corrected']}")
    if row["best_innocent"]:
        parts.append(f"best innocent p {row['best_innocent']['p_bound']:.3g}")
    parts.append(f"{row['trace_s']}s")
    log("; ".join(parts))


def attacks(case: Case) -> list[dict[str, Any]]:
    r7, r8, r9 = (case.recipients[g] for g in (7, 8, 9))
    last_shard = shard_paths(r7)[-1]
    builders: list[tuple[str, Callable[[Path], list[Path]], list[int]]] = [
        ("exact copy", lambda _: [r7], [7]),
        (f"one shard ({last_shard.name})", lambda _: [last_shard], [7]),
        ("transformers", lambda d: to_transformers(r7, d), [7]),
        ("fp16 cast", lambda d: cast(r7, d, torch.float16), [7]),
        ("fp32 cast", lambda d: cast(r7, d, torch.float32), [7]),
        ("int8 per channel", lambda d: quantize(r7, d), [7]),
        ("average of 2", lambda d: average([r7, r8], d), [7, 8]),
        ("average of 3", lambda d: average([r7, r8, r9], d), [7, 8, 9]),
        ("control: original", lambda _: [case.original], []),
    ]
    rows = []
    for name, build, expected in builders:
        out = case.work / "attack"
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        paths = build(out)
        built = time.perf_counter() - start
        row = trace_files(case, name, paths, expected)
        row["build_s"] = round(built, 1)
        rows.append(row)
        shutil.rmtree(out, ignore_errors=True)
    return rows


def unrelated(case: Case, params: dict[str, Any], seed: int) -> dict[str, Any]:
    suspect = tr.state_dict_suspect(dict(random_tensors(params, seed)), case.marks, "unrelated")
    result, seconds = run_trace(case, suspect)
    row = outcome(result, [], seconds, {"attack": "control: unrelated model", "layout": "state"})
    print_row(row)
    return row


def noise_sweep(case: Case, levels: Iterable[float]) -> dict[str, Any]:
    rows, failed_at, passed = [], None, None
    for level in levels:
        suspect = tr.state_dict_suspect(
            noisy_state(case.recipients[7], level, seed=11), case.marks, f"noise {level}"
        )
        result, seconds = run_trace(case, suspect)
        row = outcome(result, [7], seconds, {"level": level})
        print_row(row)
        rows.append(row)
        if not row["pass"]:
            failed_at = level
            break
        passed = level
    return {"levels": rows, "last_pass": passed, "first_fail": failed_at}


def run_case(
    name: str, original: Path, work: Path, n_candidates: int, levels: Iterable[float]
) -> tuple[dict[str, Any], Case]:
    timings: dict[str, float] = {}
    with timed(timings, "marks_s"):
        marks = tr.release_marks(original, KEY)
    recipients, cache = {}, {}
    with timed(timings, "recipient_copies_s"):
        for grant in (7, 8, 9):
            out = work / f"recipient-{grant}"
            code = recipient_code(KEY, grant)
            recipients[grant] = write_recipient_copy(original, out, KEY, code, cache=cache)
    del cache
    candidates = {label(g): recipient_code(KEY, g) for g in range(1, n_candidates + 1)}
    case = Case(name, original, work, marks, candidates, recipients)
    params = read_params(original)
    weight_bytes = sum(p.stat().st_size for p in shard_paths(original))
    n_params = sum(math.prod(s) for s in marks.shapes.values())
    log(
        f"{name}: {n_params / 1e6:.1f}M parameters, {weight_bytes / 1e9:.2f} GB in "
        f"{n_shards(original)} shards, {marks.n_positions:,} marked positions, "
        f"{n_candidates} candidates"
    )
    rows = attacks(case)
    rows.append(unrelated(case, params, seed=99))
    noise = noise_sweep(case, levels)
    report = {
        "model": name,
        "parameters": n_params,
        "weight_bytes": weight_bytes,
        "shards": n_shards(original),
        "marked_positions": marks.n_positions,
        "candidates": n_candidates,
        "timings": timings,
        "attacks": rows,
        "noise": noise,
    }
    return report, case


# --------------------------------------------------------------------------- quality


# Stdlib modules whose docstrings are the in-domain held-out text: Python documentation
# the demo model never saw (it was trained on pydoc_data.topics, the language reference).
DOCSTRING_MODULES = (
    "argparse", "collections", "functools", "itertools", "json", "pathlib", "re", "string",
    "textwrap", "typing", "dataclasses", "enum", "contextlib", "heapq", "bisect", "shutil",
    "subprocess", "threading", "logging", "datetime", "random", "statistics", "fractions",
    "decimal", "csv", "pickle", "copy", "abc", "operator", "inspect",
)  # fmt: skip


def stdlib_docstrings() -> list[str]:
    """Module docstrings and the longer docstrings of their public names, in name order."""
    import importlib
    import inspect

    docs = []
    for name in DOCSTRING_MODULES:
        module = importlib.import_module(name)
        if module.__doc__:
            docs.append(inspect.cleandoc(module.__doc__))
        for attr in sorted(dir(module)):
            obj = getattr(module, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            if (doc := inspect.getdoc(obj)) and len(doc) > 200:
                docs.append(doc)
    return docs


def project_docs() -> list[str]:
    """This project's docs (the portal's, another domain), except this bench's own page."""
    paths = sorted(p for p in (REPO / "docs").glob("*.md") if p.name != "fingerprinting.md")
    return [p.read_text() for p in paths]


def training_text() -> list[str]:
    from inference_demo.llama.demo_builder import corpus

    return corpus()


TEXTS: dict[str, tuple[str, Callable[[], list[str]]]] = {
    "stdlib_docstrings": ("held out, same domain", stdlib_docstrings),
    "project_docs": ("held out, other domain", project_docs),
    "training_text": ("seen in training, for reference", training_text),
}


def windows_of(tokenizer: Tokenizer, docs: list[str]) -> Tensor:
    ids = [t for doc in docs for t in tokenizer.encode(doc, bos=True, eos=True)]
    ids = ids[:PERPLEXITY_MAX_TOKENS]
    n = (len(ids) - 1) // PERPLEXITY_WINDOW
    w = PERPLEXITY_WINDOW
    return torch.tensor([ids[i * w : (i + 1) * w + 1] for i in range(n)])


@torch.inference_mode()
def perplexity(model: Transformer, windows: Tensor) -> tuple[float, Tensor]:
    """exp(mean next-token NLL) over the windows, and each position's argmax."""
    total, count, argmax = 0.0, 0, []
    for batch in windows.split(16):
        tokens, targets = batch[:, :-1], batch[:, 1:]
        pos = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
        logits = model(tokens, pos).float()
        total += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
        count += targets.numel()
        argmax.append(logits.argmax(-1))
    return math.exp(total / count), torch.cat(argmax)


def greedy(model: Transformer, tokenizer: Tokenizer) -> list[list[int]]:
    """Every prompt's greedy continuation, all decoding together in the project's engine."""
    params = SamplingParams(max_new_tokens=GREEDY_TOKENS, temperature=0.0, ignore_eos=True)
    engine = Engine(model, tokenizer, max_batch_size=len(PROMPTS), max_seq_len=PERPLEXITY_WINDOW)
    with engine:
        requests = [engine.submit(p, params) for p in PROMPTS]
        return [r.result().token_ids for r in requests]


def quality(original: Path, copy: Path) -> dict[str, Any]:
    tokenizer = Tokenizer(original / "tokenizer.model")
    texts = {name: (what, make()) for name, (what, make) in TEXTS.items()}
    windows = {name: windows_of(tokenizer, docs) for name, (_, docs) in texts.items()}
    runs = {}
    for which, directory in (("original", original), ("fingerprinted", copy)):
        model = load_model(directory, max_seq_len=PERPLEXITY_WINDOW + 1, verify=False)
        scored = {name: perplexity(model, w) for name, w in windows.items()}
        runs[which] = (scored, greedy(model, tokenizer))
    (ppl0, g0), (ppl1, g1) = runs["original"], runs["fingerprinted"]
    perplexities = {}
    for name, (what, docs) in texts.items():
        (p0, a0), (p1, a1) = ppl0[name], ppl1[name]
        perplexities[name] = {
            "text": what,
            "tokens_scored": int(windows[name][:, 1:].numel()),
            "sha256": hashlib.sha256("".join(docs).encode()).hexdigest(),
            "original": round(p0, 5),
            "fingerprinted": round(p1, 5),
            "relative_change": float(f"{(p1 - p0) / p0:.3g}"),
            "top1_agreement": round(float((a0 == a1).float().mean()), 6),
        }
    diverge = [
        next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))
        for a, b in zip(g0, g1, strict=True)
        if a != b
    ]
    _, orig_state = load_state_dict(original, verify=False)
    _, copy_state = load_state_dict(copy, verify=False)
    changed = sum(int((orig_state[k] != copy_state[k]).sum()) for k in orig_state)
    held_out = [v for v in perplexities.values() if v["text"].startswith("held out")]
    return {
        "perplexity": perplexities,
        "greedy_prompts": len(PROMPTS),
        "greedy_tokens": GREEDY_TOKENS,
        "greedy_identical": sum(a == b for a, b in zip(g0, g1, strict=True)),
        "greedy_first_divergence": diverge,
        "weights_changed": changed,
        "weights_total": sum(t.numel() for t in orig_state.values()),
        "pass": all(abs(v["relative_change"]) < 1e-3 for v in held_out),
    }


# --------------------------------------------------------------------------- main


def machine() -> str:
    cores = os.cpu_count() or 0
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cores} cores ({cpu}), {memory:.0f} GiB RAM, torch {torch.__version__}"


def summary(report: dict[str, Any]) -> Iterator[str]:
    for model in report["models"]:
        fails = [a["attack"] for a in model["attacks"] if not a["pass"]]
        noise = model["noise"]
        yield (
            f"{model['model']}: {len(model['attacks']) - len(fails)}/{len(model['attacks'])} "
            f"attacks and controls pass{' (failed: ' + ', '.join(fails) + ')' if fails else ''}; "
            f"noise: detected up to sigma {noise['last_pass']} x std, fails at "
            f"{noise['first_fail']}"
        )
    if q := report.get("quality"):
        for name, p in q["perplexity"].items():
            yield (
                f"quality: perplexity on {name} ({p['text']}, {p['tokens_scored']} tokens) "
                f"{p['original']} -> {p['fingerprinted']} ({p['relative_change']:+.3%})"
            )
        yield f"quality: greedy identical {q['greedy_identical']}/{q['greedy_prompts']}"


def _p(log10: float) -> str:
    if log10 >= 0:
        return "1"
    return f"{10**log10:.1e}" if log10 > -300 else f"1e{log10:.0f}"


def markdown(report: dict[str, Any]) -> str:
    """The figures as the tables of docs/fingerprinting.md."""
    out = [f"Measured {report['date']} on {report['machine']} ({report['elapsed_s']:.0f} s).", ""]
    for m in report["models"]:
        out += [
            f"**{m['model']}**: {m['parameters'] / 1e6:.1f}M parameters, "
            f"{m['weight_bytes'] / 1e9:.2f} GB in {m['shards']} bf16 shards, "
            f"{m['marked_positions']:,} marked positions, {m['candidates']} candidates.",
            "",
            "| attack | recipient(s): rank, corrected p | best innocent p (raw) | positions | result |",
            "|---|---|---|---|---|",
        ]
        for a in m["attacks"]:
            who = "; ".join(
                f"{r['label']}: {r['rank']}, {_p(r['log10_p_bound_corrected'])}"
                for r in a["recipients"]
            )
            best = a["best_innocent"]
            inn = f"{best['p_bound']:.2g}" if best else "-"
            held = a["positions"]["held_by_suspect"]
            verdict = "named " + ", ".join(a["named"]) if a["named"] else a["verdict"]
            out.append(
                f"| {a['attack']} | {who or '-'} | {inn} | {held:,} | "
                f"{'pass' if a['pass'] else 'FAIL'}: {verdict} |"
            )
        out += ["", "| noise sigma / tensor std | grant 7: rank, corrected p | result |"]
        out.append("|---|---|---|")
        for row in m["noise"]["levels"]:
            r = row["recipients"][0]
            out.append(
                f"| {row['level']} | {r['rank']}, {_p(r['log10_p_bound_corrected'])} | "
                f"{'pass' if row['pass'] else 'FAIL'} |"
            )
        out.append("")
    if q := report.get("quality"):
        out += [
            "| text | tokens | perplexity original | fingerprinted | change | top-1 agreement |"
        ]
        out.append("|---|---|---|---|---|---|")
        for name, p in q["perplexity"].items():
            out.append(
                f"| {name} ({p['text']}) | {p['tokens_scored']:,} | {p['original']:.4f} | "
                f"{p['fingerprinted']:.4f} | {p['relative_change']:+.4%} | "
                f"{p['top1_agreement']:.2%} |"
            )
        out += [
            "",
            f"Greedy continuations ({q['greedy_tokens']} tokens) of {q['greedy_prompts']} "
            f"prompts: {q['greedy_identical']} identical; the others first differ at token "
            f"{', '.join(map(str, q['greedy_first_divergence'])) or '-'}. Weights changed: "
            f"{q['weights_changed']:,} of {q['weights_total']:,}.",
        ]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-gb", type=float, default=2.0, help="size of the random model")
    parser.add_argument("--no-big", action="store_true", help="the demo model only")
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--workdir", help="where copies go (default: a temporary directory)")
    parser.add_argument("--markdown", help="also write the figures as markdown tables here")
    opts = parser.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    started = time.perf_counter()
    report: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": machine(),
        "target": TARGET,
        "models": [],
    }
    log(f"fingerprint bench, {report['date']}, {report['machine']}")
    with tempfile.TemporaryDirectory(dir=opts.workdir, prefix="fingerprint-bench-") as tmp:
        work = Path(tmp)
        demo, case = run_case("demo model", DEMO, work / "demo", opts.candidates, NOISE_LEVELS)
        report["models"].append(demo)
        log("quality (demo model, recipient 7's copy)")
        report["quality"] = quality(DEMO, case.recipients[7])
        shutil.rmtree(work / "demo", ignore_errors=True)
        if not opts.no_big:
            log(f"building a random {opts.big_gb} GB LLaMA-shaped checkpoint")
            timings: dict[str, float] = {}
            with timed(timings, "build_s"):
                big_dir = build_big(work / "big" / "original", opts.big_gb)
            big, _ = run_case(
                f"random {opts.big_gb:g} GB",
                big_dir,
                work / "big",
                opts.candidates,
                BIG_NOISE_LEVELS,
            )
            big["timings"].update(timings)
            big["config"] = read_params(big_dir)
            report["models"].append(big)
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    for line in summary(report):
        log(line)
    ok = all(a["pass"] for m in report["models"] for a in m["attacks"])
    ok = ok and report.get("quality", {}).get("pass", True)
    report["pass"] = ok
    if opts.markdown:
        Path(opts.markdown).write_text(markdown(report))
    print(json.dumps(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
