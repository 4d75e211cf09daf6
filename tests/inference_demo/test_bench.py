"""The benchmark's code paths on a tiny random model (timings are not asserted, only that
every labelled figure is there, positive and consistent with the workload)."""

from __future__ import annotations

import json

import transformers  # noqa: F401  (a dev dependency: missing means a broken install, not a skip)

from inference_demo.bench import main, parse_args, percentile, staggered_schedule

TINY = ["--config", "tiny", "--new-tokens", "4", "--runs", "1", "--prompt-tokens", "16"]
STAGGER = ["--stagger-requests", "4", "--stagger-seconds", "0.2"]
STAGGER += ["--stagger-prompt", "4", "20", "--stagger-new", "2", "6"]
MIXED = ["--long-prompt-tokens", "48", "--mixed-rows", "2"]


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_eager_bench_reports_every_section(capsys) -> None:
    args = [*TINY, "--no-compile", "--threads", "0", "--users", "2", "3", *STAGGER, *MIXED]
    result = main(args)
    assert last_json(capsys) == result

    assert result["compiled"] is False
    assert set(result["labels"]) >= {"ours_eager", "transformers_eager_dynamic", "headline"}
    assert "eager" in result["labels"]["transformers_eager_static"]
    assert not {"ours_compiled", "transformers_compiled_static"} & set(result["labels"])
    assert result["transformers"] == transformers.__version__
    for key in ("date", "device", "torch", "python", "load_avg_start", "load_avg_end"):
        assert result[key]

    positive = [
        "ours_eager_batch1_tok_s",
        "ours_batch1_tok_s",
        "transformers_eager_dynamic_batch1_tok_s",
        "transformers_eager_static_batch1_tok_s",
        "transformers_tok_s",
        "speedup_vs_transformers",
        "speedup_eager_vs_eager",
        "ttft_16_ms",
        "transformers_ttft_16_ms",
        "engine_3_users_tok_s",
        "ours_eager_3_users_tok_s",
        "transformers_eager_dynamic_3_users_tok_s",
        "users_3_speedup_vs_transformers",
        "users_2_speedup_eager_vs_eager",
        "ours_eager_staggered_makespan_s",
        "ours_eager_staggered_mean_latency_s",
        "transformers_eager_dynamic_staggered_makespan_s",
        "transformers_eager_static_staggered_p50_latency_s",
        "staggered_makespan_speedup_vs_transformers",
        "staggered_latency_speedup_vs_transformers",
        "mixed_unchunked_itl_p95_ms",
        "mixed_unchunked_itl_max_ms",
        "mixed_unchunked_itl_p50_before_ms",
        "mixed_unchunked_long_ttft_ms",
    ]
    if result["mixed_prefill_chunk_supported"]:
        assert 0 < result["mixed_prefill_chunk_tokens"] < 48
        positive += ["mixed_chunked_itl_p95_ms", "mixed_chunked_long_ttft_ms"]
    for key in positive:
        assert result[key] > 0, key
    assert result["transformers_best_path"] in {"eager_dynamic", "eager_static"}
    assert result["speedup_vs_transformers_path"] == result["transformers_best_path"]

    # The staggered workload: every request served once, none before its arrival.
    schedule = result["staggered_schedule"]
    assert schedule["requests"] == 4 and schedule["last_arrival_s"] == 0.2
    assert all(4 <= n <= 20 for n in schedule["prompt_tokens"])
    for path in ("eager_dynamic", "eager_static"):
        assert sum(result[f"transformers_{path}_staggered_batch_sizes"]) == 4
    for key in ("ours_eager", "transformers_eager_dynamic"):
        makespan = result[f"{key}_staggered_makespan_s"]
        assert makespan >= 0.2
        assert result[f"{key}_staggered_max_latency_s"] <= makespan
    assert result["mixed_unchunked_itl_max_ms"] >= result["mixed_unchunked_itl_p95_ms"]
    assert result["recompiles_while_timed"] == {}


def test_compiled_paths_are_labelled_and_measured(capsys) -> None:
    args = [*TINY, "--threads", "0", "--users", "--stagger-requests", "0"]
    result = main([*args, "--long-prompt-tokens", "0"])
    assert last_json(capsys) == result

    assert result["compiled"] is True
    labels = result["labels"]
    assert "torch.compile" in labels["ours_compiled"]
    assert "compile_config" in labels["transformers_compiled_static"]
    assert labels["headline"].startswith("ours_compiled")
    for key in (
        "ours_compiled_batch1_tok_s",
        "ours_eager_batch1_tok_s",
        "transformers_compiled_static_batch1_tok_s",
        "speedup_compiled_vs_compiled",
        "speedup_eager_vs_eager",
        "speedup_vs_transformers",
    ):
        assert result[key] > 0, key
    assert result["ours_batch1_tok_s"] == result["ours_compiled_batch1_tok_s"]
    assert result["speedup_compiled_vs_compiled_path"] == "compiled_static"
    assert not any(key.startswith("engine_") or "staggered" in key for key in result)


def test_staggered_schedule_is_deterministic_and_spans_the_window() -> None:
    class Vocab:
        n_words, bos_id = 512, 1

    opts = parse_args(["--stagger-requests", "16", "--stagger-seconds", "3"])
    first, again = staggered_schedule(opts, Vocab()), staggered_schedule(opts, Vocab())
    assert first == again
    assert first[0].at_s == 0.0 and first[-1].at_s == 3.0
    assert [a.at_s for a in first] == sorted(a.at_s for a in first)
    assert all(8 <= len(a.prompt) <= 300 and 16 <= a.new_tokens <= 128 for a in first)
    assert all(a.prompt[0] == 1 and min(a.prompt[1:]) >= 3 for a in first)
    assert len({len(a.prompt) for a in first}) > 8  # mixed lengths, not one repeated


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 21)]
    assert percentile(values, 95) == 19.0
    assert percentile(values, 100) == 20.0
    assert percentile([5.0], 95) == 5.0
    assert percentile([], 95) == 0.0


def test_fixed_shape_path_pads_every_batch_into_one_cache() -> None:
    import torch

    from inference_demo.bench import random_model
    from inference_demo.bench_transformers import (
        Arrival,
        fixed_shape,
        hf_arrival_batches,
        hf_generate,
        hf_model,
        hf_paths,
    )

    cpu = torch.device("cpu")
    model, _ = random_model("tiny", cpu, torch.float32, 64)
    hf = hf_model(model, None, cpu, torch.float32)
    static = next(p for p in hf_paths(cpu, compile=False) if p.key == "eager_static")
    path = fixed_shape(hf, static, rows=4, max_cache_len=32)
    cache = path.kwargs["past_key_values"]
    assert path.pad_to == 4 and "cache_implementation" not in path.kwargs
    assert hf_generate(hf, [[1, 5, 6], [1, 7]], 3, cpu, path) > 0
    assert hf_generate(hf, [[1, 5, 6, 9, 9], [1, 7], [1, 8, 8]], 4, cpu, path) > 0
    assert path.kwargs["past_key_values"] is cache and cache.max_cache_len == 32

    schedule = [Arrival(0.0, [1, 5, 6], 2), Arrival(0.0, [1, 7], 3), Arrival(0.05, [1, 9], 2)]
    finished, sizes = hf_arrival_batches(hf, schedule, cpu, path)
    assert sizes == [2, 1]  # the third arrives at 0.05 s: a batch of its own, whenever it runs
    assert finished[0] == finished[1] <= finished[2] and finished[2] >= 0.05
