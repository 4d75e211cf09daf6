"""The benchmark's code paths on a tiny random model (timings are not asserted)."""

from __future__ import annotations

import json

import transformers  # noqa: F401  (a dev dependency: missing means a broken install, not a skip)


def test_bench_smoke(capsys) -> None:
    from inference_demo.bench import main

    args = ["--config", "tiny", "--new-tokens", "4", "--runs", "1", "--prompt-tokens", "16"]
    args += ["--no-compile", "--threads", "0"]
    result = main([*args, "--users", "2", "3"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == result
    for key in ("ours_batch1_tok_s", "transformers_tok_s", "ttft_16_ms", "engine_3_users_tok_s"):
        assert result[key] > 0
