"""Text to token ids: bytes (vocab 256, the default) or a local Hugging Face tokenizer.json.

    tok = load_tokenizer("bytes")                    # or "path/tokenizer.json"
    ids = tok.encode_documents([b"def f(): ...", b"import os\n"])

A document (one file, one JSONL record) is encoded on its own and the documents are
concatenated, so the in-run path (`[data] tokenizer = ...`) and `gradproj tokenize`
produce the same stream from the same source. `tokenizers` is imported only for a JSON
tokenizer; it runs offline (`Tokenizer.from_file`, never the Hub). Token ids are stored as
uint16 when the vocabulary fits (≤ 65 536 ids), else uint32 — the `.bin` dtypes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

BYTES = "bytes"
BYTE_VOCAB = 256


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


class ByteTokenizer:
    name = BYTES
    vocab_size = BYTE_VOCAB

    def encode_documents(self, docs: Sequence[bytes],
                         progress: Callable[[int], None] | None = None) -> np.ndarray:
        out = np.frombuffer(b"".join(docs), dtype=np.uint8).copy()
        if progress:
            progress(len(docs))
        return out


class JsonTokenizer:
    """A `tokenizers` tokenizer.json; documents are UTF-8 (invalid bytes replaced)."""

    BATCH = 64  # documents per encode_batch call (parallel in Rust; progress per batch)

    def __init__(self, path: str | Path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ValueError("a tokenizer.json needs Hugging Face tokenizers: "
                             "pip install 'gradproj[hf]'") from None
        self.name = str(path)
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on a bad file
            raise ValueError(f"cannot read tokenizer {path}: {str(exc).splitlines()[0]}") from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def encode_documents(self, docs: Sequence[bytes],
                         progress: Callable[[int], None] | None = None) -> np.ndarray:
        dtype = np.dtype(token_dtype(self.vocab_size))
        parts = []
        for start in range(0, len(docs), self.BATCH):
            batch = [d.decode("utf-8", errors="replace") for d in docs[start:start + self.BATCH]]
            for enc in self.tok.encode_batch(batch, add_special_tokens=False):
                parts.append(np.asarray(enc.ids, dtype=dtype))
            if progress:
                progress(len(batch))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def load_tokenizer(name: str) -> ByteTokenizer | JsonTokenizer:
    return ByteTokenizer() if name == BYTES else JsonTokenizer(name)


def train_bpe(texts: Iterable[str], vocab_size: int = 2048) -> "tokenizers.Tokenizer":  # noqa: F821
    """A byte-level BPE tokenizer (GPT-2's scheme: every text encodes, no unknown token)
    trained locally on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok
