"""tokenizer.json written by our code: transformers' fast tokenizer encodes exactly as SentencePiece."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import transformers  # a dev dependency: missing is a broken install, not a skip
from sentencepiece import SentencePieceProcessor, SentencePieceTrainer

from inference_demo.hf_tokenizer import (
    TOKENIZER_JSON,
    PieceType,
    UnsupportedTokenizer,
    read_model,
    write_tokenizer_files,
)
from inference_demo.llama.tokenizer import Tokenizer
from tests.servers import ROOT

from .conftest import DEMO_DIR

# Text the tokenizers never saw: scripts, emoji (byte fallback), odd whitespace, code, digits.
VARIED = [
    "",
    " ",
    "   ",
    "\n",
    "\n\n\n",
    "\t",
    " leading space",
    "    four leading spaces",
    "trailing spaces   ",
    "two  spaces  between  words",
    "tab\tseparated\tvalues",
    "line one\nline two\n",
    "windows\r\nline endings\r\n",
    "naïve café, déjà vu, façade, Øresund, smörgåsbord",
    "Ωμέγα και άλφα: ελληνικά",
    "Привет, как дела? Съешь же ещё этих мягких французских булок",
    "中文字符和标点，还有句号。",
    "日本語のテキスト、カタカナとひらがな",
    "한국어 문장입니다",
    "עברית מימין לשמאל",
    "العربية من اليمين",
    "emoji 😀 grin",
    "👍🏽 skin tone and 👨‍👩‍👧 family (zero-width joiners)",
    "✨🚀🔥💯",
    "🤖🤖🤖🤖🤖🤖",
    "flags 🇫🇷🇯🇵",
    "combining e\u0301 and precomposed é",
    "zero\u200bwidth\u200bspace",
    "\ufeffbyte order mark",
    "non\u00a0breaking\u00a0space",
    "math ∑ x² ≤ ∞, √2 ≈ 1.41421356",
    "digits 0123456789 and 3.14159 and 1,000,000",
    "def f(x):\n    return x ** 2  # square\n",
    "    if not ok:\n        raise ValueError('no')",
    'json {"key": [1, 2, 3], "null": null}',
    "<html><body class='x'>&amp;</body></html>",
    "path/to/file.py:42: in <module>",
    "x" * 200,
    "ab " * 50,
    "Mixed: ASCII, ünïcödé, 漢字, 😀, \t tabs, and  spaces.",
]


def corpus_lines() -> list[str]:
    from pydoc_data.topics import topics

    lines = [line for name in sorted(topics) for line in topics[name].splitlines()]
    return lines[::40] + VARIED  # ~290 documentation lines, and the hard cases


@pytest.fixture(scope="module")
def multilingual_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tokenizer whose merges involve multi-byte characters and whitespace pieces."""
    text = [line for line in VARIED if line.strip()] * 20
    model = io.BytesIO()
    SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_writer=model,
        model_type="bpe",
        vocab_size=1200,
        hard_vocab_limit=False,
        byte_fallback=True,
        split_digits=True,
        character_coverage=0.98,  # leaves rare characters to byte fallback
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
        num_threads=1,
    )
    path = tmp_path_factory.mktemp("ml") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(params=["demo", "multilingual"])
def tokenizer_dir(request, tmp_path: Path, multilingual_model: Path) -> Path:
    model = DEMO_DIR / "tokenizer.model" if request.param == "demo" else multilingual_model
    write_tokenizer_files(tmp_path, model, model_max_length=2048)
    return tmp_path


def test_auto_tokenizer_is_fast_and_encodes_like_sentencepiece(tokenizer_dir: Path) -> None:
    hf = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    ours = Tokenizer(tokenizer_dir / "tokenizer.model")
    assert isinstance(hf, transformers.LlamaTokenizerFast) and hf.is_fast
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (1, 2, 0)
    assert hf.model_max_length == 2048

    lines = corpus_lines()
    assert len(lines) > 300
    byte_fallback = 0
    for text in lines:
        expected = ours.encode(text, bos=True, eos=False)
        assert hf(text).input_ids == expected, text
        assert hf.decode(expected, skip_special_tokens=True) == ours.decode(expected) == text
        byte_fallback += any(ours.sp.is_byte(i) for i in expected)
    assert byte_fallback >= 10  # the emoji and scripts did go through byte fallback
    # Several lines at once, and a multi-line document, as one string.
    document = "\n".join(VARIED)
    assert hf(document).input_ids == ours.encode(document, bos=True, eos=False)


def test_files_and_configs(tokenizer_dir: Path) -> None:
    names = {p.name for p in tokenizer_dir.iterdir()}
    assert names == {
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizerFast"
    assert (config["add_bos_token"], config["add_eos_token"]) == (True, False)
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == (
        "<s>",
        "</s>",
        "<unk>",
    )
    assert json.loads((tokenizer_dir / "special_tokens_map.json").read_text()) == {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    spec = json.loads((tokenizer_dir / TOKENIZER_JSON).read_text())
    sp = SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    vocab = spec["model"]["vocab"]
    assert vocab == {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    assert spec["model"]["byte_fallback"] and spec["model"]["type"] == "BPE"
    assert all(a in vocab and b in vocab and a + b in vocab for a, b in spec["model"]["merges"])


def test_model_reader_agrees_with_sentencepiece(multilingual_model: Path) -> None:
    model = read_model(multilingual_model)
    sp = SentencePieceProcessor(model_file=str(multilingual_model))
    assert len(model.pieces) == sp.vocab_size()
    for i, piece in enumerate(model.pieces):
        assert piece.text == sp.id_to_piece(i)
        assert piece.score == pytest.approx(sp.get_score(i))
        assert (piece.type == PieceType.BYTE) == sp.is_byte(i)
        assert (piece.type == PieceType.CONTROL) == sp.is_control(i)
        assert (piece.type == PieceType.UNKNOWN) == sp.is_unknown(i)


BLOCKED = textwrap.dedent(
    """
    import json, sys
    sys.modules["sentencepiece"] = None  # any import of it now raises ImportError
    sys.modules["google.protobuf"] = None
    import transformers
    from transformers.utils import is_protobuf_available, is_sentencepiece_available

    assert not is_sentencepiece_available() and not is_protobuf_available()
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("sentencepiece is still importable")
    tok = transformers.AutoTokenizer.from_pretrained(sys.argv[1])
    texts = json.loads(sys.argv[2])
    print(json.dumps({
        "class": type(tok).__name__,
        "ids": [tok(t).input_ids for t in texts],
        "decoded": [tok.decode(tok(t).input_ids, skip_special_tokens=True) for t in texts],
    }))
    """
)


def test_loads_without_sentencepiece_or_protobuf(tmp_path: Path) -> None:
    write_tokenizer_files(tmp_path, DEMO_DIR / "tokenizer.model", model_max_length=256)
    texts = ["The for statement", " two  spaces\nand emoji 😀", "naïve 中文"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", BLOCKED, str(tmp_path), json.dumps(texts)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    ours = Tokenizer(DEMO_DIR / "tokenizer.model")
    assert got["class"] == "LlamaTokenizerFast"
    assert got["ids"] == [ours.encode(t, bos=True, eos=False) for t in texts]
    assert got["decoded"] == texts


def _train(tmp_path: Path, **overrides) -> Path:
    options = dict(
        model_type="bpe",
        vocab_size=800,
        hard_vocab_limit=False,
        character_coverage=0.99,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
        num_threads=1,
    )
    options.update(overrides)
    model = io.BytesIO()
    SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in VARIED if line.strip()] * 20),
        model_writer=model,
        **options,
    )
    path = tmp_path / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(model_type="unigram"), "model_type is UNIGRAM; the Llama fast tokenizer needs BPE"),
        (dict(byte_fallback=False), "byte_fallback is False"),
        (dict(normalization_rule_name="nmt_nfkc"), "normalizer is nmt_nfkc"),
        (dict(remove_extra_whitespaces=True), "remove_extra_whitespaces is True"),
        (dict(add_dummy_prefix=False), "add_dummy_prefix is False"),
        (dict(unk_id=2, bos_id=0, eos_id=1), "tokenizer.model: expected unk '<unk>' at id 0"),
    ],
)
def test_models_it_cannot_reproduce_are_refused(tmp_path: Path, overrides, message) -> None:
    path = _train(tmp_path, **overrides)
    with pytest.raises(UnsupportedTokenizer, match=message.replace("(", r"\(")):
        write_tokenizer_files(tmp_path, path, model_max_length=64)
    assert not (tmp_path / TOKENIZER_JSON).exists()


@pytest.mark.parametrize(
    "data",
    [b"", bytes(range(256)) * 4, b"IWFuaWNlIHRpa3Rva2VuIGZpbGUK 0\n"],  # empty, noise, tiktoken
    ids=["empty", "noise", "tiktoken"],
)
def test_a_file_that_is_no_sentencepiece_model_is_refused(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "tokenizer.model"
    path.write_bytes(data)
    with pytest.raises(UnsupportedTokenizer, match="tokenizer.model is not a SentencePiece model"):
        read_model(path)
