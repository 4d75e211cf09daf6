"""A Hugging Face fast tokenizer (``tokenizer.json``) built from LLaMA's SentencePiece model.

Written by our own code, so that publishing needs neither transformers nor protobuf:
the model file is read with a minimal protobuf wire-format reader, and the output is
what transformers' ``LlamaConverter`` produces for LLaMA 1 and 2 (a BPE model with byte
fallback, the ``Prepend("▁")`` + ``Replace(" ", "▁")`` normalizer, BOS added by the post
processor, the ``Replace``/``ByteFallback``/``Fuse``/``Strip`` decoder), with merges
derived from the piece scores.

Only the SentencePiece settings that this tokenizer.json reproduces exactly are accepted
(BPE, byte fallback, identity normalization, a dummy prefix, whitespace kept); any
other model raises ``UnsupportedTokenizer`` rather than yield a tokenizer that differs.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
TOKENIZER_MODEL = "tokenizer.model"
SPACE = "\u2581"  # SentencePiece's visible space, "▁"

ERR_NOT_SPM = "{path} is not a SentencePiece model ({reason})"
ERR_SETTING = "{path}: {setting} is {value}; the Llama fast tokenizer needs {needed}"
ERR_SPECIAL = "{path}: expected {name} {piece!r} at id {id}, found {found!r}"


class UnsupportedTokenizer(ValueError):
    """The file is not a SentencePiece model that a Llama fast tokenizer reproduces exactly."""


class PieceType(IntEnum):
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


class ModelType(IntEnum):
    UNIGRAM = 1
    BPE = 2
    WORD = 3
    CHAR = 4


@dataclass(frozen=True)
class Piece:
    text: str
    score: float
    type: PieceType


@dataclass
class SentencePieceModel:
    """The fields of sentencepiece_model.proto that decide how text is tokenized."""

    pieces: list[Piece] = field(default_factory=list)
    model_type: int = ModelType.UNIGRAM
    byte_fallback: bool = False
    treat_whitespace_as_suffix: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    normalizer_name: str = ""
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


# --- protobuf wire format: just enough to read sentencepiece_model.proto -------------------


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ValueError("varint too long")


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) pairs: varints and fixed32/64 as ints, the rest as bytes."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = int.from_bytes(data[pos : pos + 8], "little"), pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = int.from_bytes(data[pos : pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated field")
        yield number, value


def _int32(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value  # negative int32 are 10-byte varints


def _piece(data: bytes) -> Piece:
    text, score, kind = "", 0.0, PieceType.NORMAL
    for number, value in _fields(data):
        if number == 1:
            text = bytes(value).decode("utf-8")
        elif number == 2:
            score = struct.unpack("<f", int(value).to_bytes(4, "little"))[0]
        elif number == 3:
            kind = PieceType(value)
    return Piece(text, score, kind)


def parse_model(data: bytes) -> SentencePieceModel:
    model = SentencePieceModel()
    for number, value in _fields(data):
        if number == 1:
            model.pieces.append(_piece(value))
        elif number == 2:
            for n, v in _fields(value):
                if n == 3:
                    model.model_type = v
                elif n == 24:
                    model.treat_whitespace_as_suffix = bool(v)
                elif n == 35:
                    model.byte_fallback = bool(v)
                elif n in (40, 41, 42):
                    setattr(model, {40: "unk_id", 41: "bos_id", 42: "eos_id"}[n], _int32(v))
        elif number == 3:
            for n, v in _fields(value):
                if n == 1:
                    model.normalizer_name = bytes(v).decode("utf-8")
                elif n == 2:
                    model.precompiled_charsmap = bytes(v)
                elif n == 3:
                    model.add_dummy_prefix = bool(v)
                elif n == 4:
                    model.remove_extra_whitespaces = bool(v)
                elif n == 5:
                    model.escape_whitespaces = bool(v)
    return model


def _model_type_name(value: int) -> str:
    try:
        return ModelType(value).name
    except ValueError:
        return str(value)


def read_model(path: Path, *, display: str | None = None) -> SentencePieceModel:
    """Parse `path` and refuse anything this module cannot turn into an exact fast tokenizer;
    errors name it `display` (default: its file name)."""
    shown = display or path.name
    try:
        model = parse_model(path.read_bytes())
    except (ValueError, UnicodeDecodeError, struct.error) as exc:
        raise UnsupportedTokenizer(ERR_NOT_SPM.format(path=shown, reason=exc)) from None
    if not model.pieces:
        raise UnsupportedTokenizer(ERR_NOT_SPM.format(path=shown, reason="no pieces"))
    required = [
        ("model_type", _model_type_name(model.model_type), "BPE"),
        ("byte_fallback", model.byte_fallback, True),
        ("normalizer", model.normalizer_name or "nmt_nfkc", "identity"),
        ("precompiled_charsmap", "set" if model.precompiled_charsmap else "empty", "empty"),
        ("add_dummy_prefix", model.add_dummy_prefix, True),
        ("remove_extra_whitespaces", model.remove_extra_whitespaces, False),
        ("escape_whitespaces", model.escape_whitespaces, True),
        ("treat_whitespace_as_suffix", model.treat_whitespace_as_suffix, False),
    ]
    for setting, value, needed in required:
        if value != needed:
            raise UnsupportedTokenizer(
                ERR_SETTING.format(path=shown, setting=setting, value=value, needed=needed)
            )
    for name, text, index, found_id in (
        ("unk", "<unk>", 0, model.unk_id),
        ("bos", "<s>", 1, model.bos_id),
        ("eos", "</s>", 2, model.eos_id),
    ):
        found = model.pieces[index].text if index < len(model.pieces) else None
        if found_id != index or found != text:
            raise UnsupportedTokenizer(
                ERR_SPECIAL.format(path=shown, name=name, piece=text, id=index, found=found)
            )
    return model


# --- tokenizer.json ------------------------------------------------------------------------


def bpe_merges(pieces: list[Piece]) -> list[list[str]]:
    """Merge rules in SentencePiece's priority: the merged piece's score, highest first.

    Only normal pieces take part, as in SentencePiece's BPE (control, byte and unused pieces
    are never produced by merging); ties are ordered as transformers' LlamaConverter does.
    """
    vocab = {p.text: i for i, p in enumerate(pieces) if p.type == PieceType.NORMAL}
    merges: list[tuple[str, str, float]] = []
    for merged, index in vocab.items():
        splits = [
            (merged[:k], merged[k:])
            for k in range(1, len(merged))
            if merged[:k] in vocab and merged[k:] in vocab
        ]
        splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges.extend((left, right, pieces[index].score) for left, right in splits)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [[left, right] for left, right, _ in merges]


def _added_token(index: int, content: str, *, special: bool) -> dict[str, Any]:
    return {
        "id": index,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def added_tokens(model: SentencePieceModel) -> list[dict[str, Any]]:
    """Matched in the raw text before the model runs: specials, and user-defined symbols."""
    return [
        _added_token(i, p.text, special=p.type != PieceType.USER_DEFINED)
        for i, p in enumerate(model.pieces)
        if p.type in (PieceType.UNKNOWN, PieceType.CONTROL, PieceType.USER_DEFINED)
    ]


def tokenizer_json(model: SentencePieceModel) -> dict[str, Any]:
    bos = model.pieces[model.bos_id].text
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens(model),
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": SPACE},
                {"type": "Replace", "pattern": {"String": " "}, "content": SPACE},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [model.bos_id], "tokens": [bos]}},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": model.pieces[model.unk_id].text,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": {p.text: i for i, p in enumerate(model.pieces)},
            "merges": bpe_merges(model.pieces),
        },
    }


def tokenizer_config(model: SentencePieceModel, model_max_length: int) -> dict[str, Any]:
    added = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added_tokens(model)}
    return {
        "tokenizer_class": "LlamaTokenizerFast",
        **special_tokens(model),
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "clean_up_tokenization_spaces": False,
        "legacy": True,  # the slow LlamaTokenizer then tokenizes exactly as SentencePiece
        "model_max_length": model_max_length,
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "use_default_system_prompt": False,
    }


def special_tokens(model: SentencePieceModel) -> dict[str, str]:
    return {
        "bos_token": model.pieces[model.bos_id].text,
        "eos_token": model.pieces[model.eos_id].text,
        "unk_token": model.pieces[model.unk_id].text,
    }


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer_files(dst: Path, model_path: Path, *, model_max_length: int) -> list[str]:
    """tokenizer.model (copied), tokenizer.json, tokenizer_config.json, special_tokens_map.json."""
    model = read_model(model_path)
    shutil.copyfile(model_path, dst / TOKENIZER_MODEL)
    _write_json(dst / TOKENIZER_JSON, tokenizer_json(model))
    _write_json(dst / TOKENIZER_CONFIG, tokenizer_config(model, model_max_length))
    _write_json(dst / SPECIAL_TOKENS_MAP, special_tokens(model))
    return [TOKENIZER_MODEL, TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP]
