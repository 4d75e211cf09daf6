from __future__ import annotations

import pytest
import torch

from inference_demo.llama.generation import (
    PromptTooLong,
    SamplingParams,
    StopMatcher,
    generate,
    logits_to_probs,
    sample,
    top_p_filter,
)

PROMPT = "The for statement"


def test_greedy_is_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 0.0, 4.9]])
    assert sample(logits, SamplingParams(), None).tolist() == [1, 0]


def test_top_k_one_is_greedy_at_any_temperature() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=5.0, top_k=1)
    got = sample(logits, params, torch.Generator().manual_seed(1))
    assert torch.equal(got, logits.argmax(-1))


def test_top_k_masks_the_tail() -> None:
    probs = logits_to_probs(torch.tensor([1.0, 2.0, 3.0, 4.0]), temperature=1.0, top_k=2)
    assert probs[:2].tolist() == [0.0, 0.0]
    assert probs.sum().item() == pytest.approx(1.0)


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([0.1, 0.5, 0.15, 0.25])
    kept = top_p_filter(probs, 0.7)  # 0.5 + 0.25 reaches 0.7
    assert kept.tolist() == pytest.approx([0.0, 0.5 / 0.75, 0.0, 0.25 / 0.75])


def test_seeded_sampling_is_reproducible_and_seed_dependent() -> None:
    logits = torch.zeros(64, 100)
    params = SamplingParams(temperature=1.0, top_p=0.9)
    a = sample(logits, params, torch.Generator().manual_seed(7))
    b = sample(logits, params, torch.Generator().manual_seed(7))
    c = sample(logits, params, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([0.2, 0.8])).expand(4000, 2)
    draws = sample(logits, SamplingParams(temperature=1.0), torch.Generator().manual_seed(0))
    assert draws.float().mean().item() == pytest.approx(0.8, abs=0.03)


@pytest.mark.parametrize(
    "bad", [dict(max_new_tokens=0), dict(temperature=-1), dict(top_k=0), dict(top_p=0.0)]
)
def test_sampling_params_are_validated(bad) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_stop_matcher_across_deltas() -> None:
    stop = StopMatcher(["\nEND"])
    assert stop.feed("Hel") == ("Hel", False)
    assert stop.feed("lo\nE") == ("lo", False)  # "\nE" may start the stop string
    assert stop.feed("ND more") == ("", True)


def test_stop_matcher_releases_a_false_alarm() -> None:
    stop = StopMatcher(["\nEND", "###"])
    assert stop.feed("a\nE") == ("a", False)
    assert stop.feed("xit #") == ("\nExit ", False)
    assert stop.flush() == "#"


# With the bundled demo model.


def full_recompute_greedy(model, ids: list[int], n: int) -> list[int]:
    """No KV cache: every step runs the whole sequence again."""
    from inference_demo.llama.checkpoint import load_model
    from tests.inference_demo.conftest import DEMO_DIR

    fresh = load_model(DEMO_DIR, max_seq_len=256)  # caches never set up
    out = list(ids)
    with torch.inference_mode():
        for _ in range(n):
            tokens = torch.tensor([out])
            logits = fresh(tokens, torch.arange(len(out)).unsqueeze(0))
            out.append(int(logits[0, -1].argmax()))
    return out[len(ids) :]


def test_kv_cache_greedy_equals_full_recomputation(demo_model, demo_tokenizer) -> None:
    ids = demo_tokenizer.encode(PROMPT, bos=True, eos=False)
    params = SamplingParams(max_new_tokens=24)
    completion = generate(demo_model, demo_tokenizer, ids, params).collect()
    assert len(completion.token_ids) == 24
    assert completion.token_ids == full_recompute_greedy(demo_model, ids, 24)


def test_stream_deltas_add_up_and_timings(demo_model, demo_tokenizer) -> None:
    stream = generate(demo_model, demo_tokenizer, PROMPT, SamplingParams(max_new_tokens=20))
    deltas = list(stream)
    completion = stream.completion
    assert completion is not None
    assert "".join(deltas) == completion.text
    assert completion.text == demo_tokenizer.decode(completion.token_ids) or completion.text[1:]
    assert completion.finish_reason == "length"
    t = completion.timings
    assert (t.prompt_tokens, t.generated_tokens) == (4, 20)
    assert 0 < t.ttft_s <= t.total_s
    assert t.tokens_per_s > 0


def test_stop_string_ends_generation(demo_model, demo_tokenizer) -> None:
    free = generate(demo_model, demo_tokenizer, PROMPT, SamplingParams(max_new_tokens=40))
    text = free.collect().text
    stop = text[12:16]
    stopped = generate(
        demo_model, demo_tokenizer, PROMPT, SamplingParams(max_new_tokens=40, stop=(stop,))
    ).collect()
    assert stopped.finish_reason == "stop"
    assert stopped.text == text[: text.index(stop)]


def test_prompt_too_long(demo_model, demo_tokenizer) -> None:
    with pytest.raises(PromptTooLong):
        generate(demo_model, demo_tokenizer, list(range(3, 300))).collect()
