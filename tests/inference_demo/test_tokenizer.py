from __future__ import annotations

import pytest

from inference_demo.llama.tokenizer import StreamDecoder, Tokenizer

TEXTS = [
    "The for statement is used to iterate over the elements of a sequence.",
    "def f(x):\n    return x  # indentation and  double spaces survive\n",
    "Café crème, naïve façade",
    "日本語のテキスト",
    "emoji: 😀🐍 and a flag 🇫🇷",
    "",
]


def test_special_ids(demo_tokenizer: Tokenizer) -> None:
    assert (demo_tokenizer.bos_id, demo_tokenizer.eos_id, demo_tokenizer.pad_id) == (1, 2, -1)
    assert demo_tokenizer.sp.id_to_piece([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert demo_tokenizer.n_words == 2048
    # Byte fallback pieces sit right after the specials, as in LLaMA: newline is 13.
    assert demo_tokenizer.sp.piece_to_id("<0x0A>") == 13


def test_encode_bos_eos(demo_tokenizer: Tokenizer) -> None:
    plain = demo_tokenizer.encode("hello world", bos=False, eos=False)
    assert demo_tokenizer.encode("hello world", bos=True, eos=False) == [1, *plain]
    assert demo_tokenizer.encode("hello world", bos=True, eos=True) == [1, *plain, 2]
    assert demo_tokenizer.encode("", bos=True, eos=True) == [1, 2]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(demo_tokenizer: Tokenizer, text: str) -> None:
    ids = demo_tokenizer.encode(text, bos=True, eos=True)
    assert demo_tokenizer.decode(ids) == text


def test_unseen_characters_use_byte_fallback(demo_tokenizer: Tokenizer) -> None:
    ids = demo_tokenizer.encode("😀", bos=False, eos=False)
    pieces = demo_tokenizer.sp.id_to_piece(ids)
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert 0 not in ids  # never <unk>


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_never_emits_broken_characters(demo_tokenizer: Tokenizer, text: str) -> None:
    decoder = StreamDecoder(demo_tokenizer)
    deltas = [decoder.push(t) for t in demo_tokenizer.encode(text, bos=False, eos=False)]
    deltas.append(decoder.flush())
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_streaming_holds_partial_bytes(demo_tokenizer: Tokenizer) -> None:
    decoder = StreamDecoder(demo_tokenizer)
    ids = demo_tokenizer.encode("a😀", bos=False, eos=False)
    deltas = [decoder.push(t) for t in ids]
    assert deltas[-4:-1] == ["", "", ""]
    assert deltas[-1].endswith("😀")


def test_streaming_after_a_prompt_keeps_the_leading_space(demo_tokenizer: Tokenizer) -> None:
    prompt = demo_tokenizer.encode("The for", bos=True, eos=False)
    decoder = StreamDecoder(demo_tokenizer, prompt)
    continuation = demo_tokenizer.encode("The for statement é", bos=True, eos=False)[len(prompt) :]
    deltas = [decoder.push(t) for t in continuation] + [decoder.flush()]
    assert "".join(deltas) == " statement é"
