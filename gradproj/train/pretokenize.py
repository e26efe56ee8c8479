"""`gradproj tokenize`: text, a folder of text files, or JSONL into a `.bin` of token ids.

    gradproj tokenize docs/ -o data/train.bin --tokenizer tok.json      # folder, glob **/*.txt
    gradproj tokenize corpus.jsonl -o data/train.bin --tokenizer tok.json --text-key text

The output is the `[data] source = "tokens"` format: a flat array of uint16 ids (uint32
when the vocabulary exceeds 65 536), no header. Documents are encoded one by one, in the
order the run's own `source = "text"`/`"jsonl"` reads them, with the same tokenizer code,
so a run on the `.bin` (`source = "tokens"`, same `tokenizer`, same `eval_fraction`)
draws exactly the batches of a run on the text. The file is written to OUT.tmp and
renamed when complete. The progress bar (tqdm) is drawn only on a terminal; in a log
there is one summary line.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from .data import DataError, jsonl_documents, text_files
from .tokenizer import BYTES, load_tokenizer, token_dtype


def add_tokenize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="INPUT", help="a text file, a folder of text files, or a .jsonl file")
    p.add_argument("-o", "--out", required=True, metavar="OUT.bin", help="token file to write")
    p.add_argument("--tokenizer", default=BYTES,
                   help='"bytes" (default) or a local tokenizer.json (HF tokenizers)')
    p.add_argument("--format", choices=("text", "jsonl"), default=None,
                   help="default: jsonl for *.jsonl, text otherwise")
    p.add_argument("--glob", default="**/*.txt", help="files read from a folder (default **/*.txt)")
    p.add_argument("--text-key", default="text", help="JSONL field holding the text")


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="doc", file=sys.stderr, disable=None, dynamic_ncols=True)


def tokenize_to_bin(source: Path, out: Path, tokenizer_name: str, fmt: str | None = None,
                    pattern: str = "**/*.txt", text_key: str = "text", show: bool = True) -> dict:
    """Encode `source` into `out`; returns what was written (for the summary line)."""
    tokenizer = load_tokenizer(tokenizer_name)
    fmt = fmt or ("jsonl" if source.suffix == ".jsonl" else "text")
    if fmt == "jsonl":
        records = jsonl_documents(source, text_key)
        docs, read = records, lambda chunk: chunk
    else:  # files are read a batch at a time: a large folder never sits in memory at once
        docs, read = text_files(source, pattern), lambda chunk: [f.read_bytes() for f in chunk]
    dtype = token_dtype(tokenizer.vocab_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    bar = _progress(len(docs)) if show else None
    count = 0
    t0 = time.perf_counter()
    with tmp.open("wb") as f:
        step = 256  # documents per write: bounded memory on a large corpus
        for start in range(0, len(docs), step):
            ids = tokenizer.encode_documents(read(docs[start:start + step]),
                                             progress=bar.update if bar else None)
            np.ascontiguousarray(ids, dtype=dtype).tofile(f)
            count += ids.size
    if bar:
        bar.close()
    os.replace(tmp, out)
    return {"documents": len(docs), "tokens": count, "dtype": dtype,
            "vocab_size": tokenizer.vocab_size, "seconds": time.perf_counter() - t0}


def cmd_tokenize(args: argparse.Namespace) -> int:
    from .cli import UserError

    source, out = Path(args.input), Path(args.out)
    if args.tokenizer != BYTES and not Path(args.tokenizer).is_file():
        raise UserError(f"tokenize: --tokenizer: no such file: {args.tokenizer}")
    try:
        info = tokenize_to_bin(source, out, args.tokenizer, args.format, args.glob, args.text_key)
    except (DataError, ValueError) as exc:
        raise UserError(f"tokenize: {exc}") from None
    print(f"wrote {out}: {info['tokens']} {info['dtype']} tokens from {info['documents']} "
          f"documents (vocab {info['vocab_size']}) in {info['seconds']:.1f}s; train on it with "
          f"[data] source = \"tokens\", path = \"{out}\", tokenizer = \"{args.tokenizer}\"")
    return 0
