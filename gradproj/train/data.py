"""Token streams for training: the embedded offline corpus, user text/JSONL, `.bin` memmaps.

Every source becomes two 1-D token arrays (train, eval). Batches are random windows of
`seq_len + 1` tokens (nanoGPT's sampling), drawn from a generator seeded by
(seed, step, micro-batch), so the data position of a run is just its step counter:
a resumed run reads exactly the batches the uninterrupted run would have.

The embedded corpus is the Python standard library's own top-level `*.py` files (about
170 files, 4.7 MB on CPython 3.11): real text on any machine with Python, no download.
Files are sorted by name; every 20th file (index % 20 == 19) is held out for evaluation,
so train and eval never share a file. Tokens are bytes (vocab 256), or the ids of a
`[data] tokenizer` (tokenizer.py), each document encoded on its own.
"""
from __future__ import annotations

import hashlib
import json
import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .tokenizer import BYTE_VOCAB, ByteTokenizer  # noqa: F401  (BYTE_VOCAB re-exported)

EVAL_EVERY_NTH_FILE = 20  # 5 % of the embedded files are held out
TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


class DataError(ValueError):
    """A user-facing data problem (missing file, too little text, bad JSONL line)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key  # the [data] key it concerns, for the one-line CLI message


@dataclass(frozen=True)
class Corpus:
    train: np.ndarray
    eval: np.ndarray
    vocab_size: int
    description: str   # what was read, for the log and the resolved spec
    digest: str        # sha256 prefix of the tokens: two runs on different data differ here

    def unigram_entropy(self) -> float:
        """Entropy (nats/token) of the train split's token frequencies: the loss a model
        that ignores context cannot beat, measured on the eval split (cross-entropy)."""
        counts = np.bincount(self.train, minlength=self.vocab_size).astype(np.float64)
        probs = (counts + 1.0) / (counts.sum() + self.vocab_size)  # add-one: no log(0)
        eval_counts = np.bincount(self.eval, minlength=self.vocab_size).astype(np.float64)
        return float(-(eval_counts * np.log(probs)).sum() / eval_counts.sum())


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).view(np.uint8).data)
    return h.hexdigest()[:16]


def embedded_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in stdlib.glob("*.py") if p.is_file())


def load_embedded(tokenizer=None) -> Corpus:
    tokenizer = tokenizer or ByteTokenizer()
    files = embedded_files()
    if len(files) < EVAL_EVERY_NTH_FILE:
        raise DataError("source", f"the embedded corpus needs the Python standard library's "
                        f"source files; found {len(files)} in {sysconfig.get_paths()['stdlib']}")
    train, held = [], []
    for i, path in enumerate(files):
        (held if i % EVAL_EVERY_NTH_FILE == EVAL_EVERY_NTH_FILE - 1 else train).append(
            path.read_bytes())
    tr, ev = tokenizer.encode_documents(train), tokenizer.encode_documents(held)
    return Corpus(tr, ev, tokenizer.vocab_size, f"embedded: {len(files)} stdlib files from "
                  f"{files[0].parent} ({tr.size + ev.size} tokens, {tokenizer.name})",
                  _digest(tr, ev))


def _split(tokens: np.ndarray, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    cut = len(tokens) - int(math.ceil(len(tokens) * eval_fraction))
    return tokens[:cut], tokens[cut:]


def text_files(path: Path, pattern: str) -> list[Path]:
    if not path.exists():
        raise DataError("path", f"no such file or folder: {path}")
    files = [path] if path.is_file() else sorted(p for p in path.glob(pattern) if p.is_file())
    if not files:
        raise DataError("glob", f"no files match {pattern!r} under {path}")
    return files


def load_text(path: Path, pattern: str, eval_fraction: float, tokenizer=None) -> Corpus:
    tokenizer = tokenizer or ByteTokenizer()
    files = text_files(path, pattern)
    tokens = tokenizer.encode_documents([f.read_bytes() for f in files])
    tr, ev = _split(tokens, eval_fraction)
    return Corpus(tr, ev, tokenizer.vocab_size, f"text: {len(files)} file(s) under {path} "
                  f"({tokens.size} tokens, {tokenizer.name})", _digest(tr, ev))


def jsonl_documents(path: Path, key: str) -> list[bytes]:
    """Each record's `key` text plus a newline, as UTF-8."""
    if not path.is_file():
        raise DataError("path", f"no such file: {path}")
    chunks = []
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError("path", f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(key), str):
                raise DataError("text_key", f"{path}:{lineno}: expected an object with a string "
                                f"field {key!r}")
            chunks.append(record[key].encode("utf-8") + b"\n")
    return chunks


def load_jsonl(path: Path, key: str, eval_fraction: float, tokenizer=None) -> Corpus:
    tokenizer = tokenizer or ByteTokenizer()
    chunks = jsonl_documents(path, key)
    tokens = tokenizer.encode_documents(chunks)
    tr, ev = _split(tokens, eval_fraction)
    return Corpus(tr, ev, tokenizer.vocab_size, f"jsonl: {len(chunks)} records from {path} "
                  f"({tokenizer.name})", _digest(tr, ev))


def load_tokens(path: Path, eval_path: Path | None, dtype: str, vocab_size: int,
                eval_fraction: float) -> Corpus:
    """nanoGPT layout: a flat array of token ids, no header, read through np.memmap."""
    np_dtype = TOKEN_DTYPES[dtype]
    for key, p in (("path", path), ("eval_path", eval_path)):
        if p is not None and not p.is_file():
            raise DataError(key, f"no such file: {p}")
        if p is not None and p.stat().st_size % np.dtype(np_dtype).itemsize:
            raise DataError(key, f"{p} is {p.stat().st_size} bytes, not a whole number of "
                            f"{dtype} tokens")
    tokens = np.memmap(path, dtype=np_dtype, mode="r")
    if eval_path is not None:
        tr, ev = tokens, np.memmap(eval_path, dtype=np_dtype, mode="r")
    else:
        tr, ev = _split(tokens, eval_fraction)
    # a digest of the whole file would cost a pass over gigabytes: hash size and edges
    edge = 1 << 16
    digest = _digest(np.array([tr.size, ev.size]), tr[:edge], tr[-edge:], ev[:edge])
    return Corpus(tr, ev, vocab_size, f"tokens: {path} ({tokens.size} {dtype})", digest)


class Batches:
    """Seeded random windows: `batch(step, micro)` is a pure function of its arguments."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                 vocab_size: int, split: str):
        if len(tokens) < seq_len + 2:
            raise DataError("seq_len", f"the {split} split has {len(tokens)} tokens; it needs "
                            f"more than seq_len + 1 = {seq_len + 1}")
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.vocab_size, self.split = seed, vocab_size, split

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + step) * 1_009 + micro)  # distinct per (seed, step, micro)
        high = len(self.tokens) - self.seq_len - 1
        starts = torch.randint(0, high + 1, (self.batch_size,), generator=gen).tolist()
        rows = np.stack([np.asarray(self.tokens[s:s + self.seq_len + 1], dtype=np.int64)
                         for s in starts])
        if rows.max() >= self.vocab_size:
            raise DataError("path", f"token id {int(rows.max())} in the {self.split} split is "
                            f">= the model's vocab_size {self.vocab_size}")
        window = torch.from_numpy(rows)
        return window[:, :-1], window[:, 1:]
