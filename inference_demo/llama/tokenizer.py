"""SentencePiece tokenizer (LLaMA's ``tokenizer.model``) and streaming detokenisation."""

from __future__ import annotations

from pathlib import Path

from sentencepiece import SentencePieceProcessor

REPLACEMENT = "\ufffd"


class Tokenizer:
    def __init__(self, model_path: str | Path) -> None:
        self.sp = SentencePieceProcessor(model_file=str(model_path))
        self.n_words: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()

    def encode(self, s: str, *, bos: bool, eos: bool) -> list[int]:
        ids: list[int] = self.sp.encode(s)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


class StreamDecoder:
    """Turns a growing list of token ids into text deltas.

    SentencePiece drops the leading space of the first piece it decodes and byte-fallback
    tokens only become a character once all their bytes are there, so each step decodes
    a short window that starts a few tokens back and holds text that ends in U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer, context: list[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(context or [])
        self.read = len(self.ids)
        self.prefix = max(0, self.read - 6)

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, *, final: bool) -> str:
        seen = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        if len(text) <= len(seen) or (text.endswith(REPLACEMENT) and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(seen) :]
