"""Train the example byte-level BPE tokenizer on the embedded corpus (offline, ~10 s).

    python examples/train_tokenizer.py                      # -> examples/tokenizers/stdlib-bpe-4k.json
    python examples/train_tokenizer.py --vocab 8192 -o my-tokenizer.json

Only the corpus' training files are read (every 20th stdlib file is held out for eval,
as in the runs), so an eval loss never sees text the tokenizer was fit on.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from gradproj.train.data import EVAL_EVERY_NTH_FILE, embedded_files
from gradproj.train.tokenizer import train_bpe


def main() -> None:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary size (default 4096)")
    p.add_argument("-o", "--out", type=Path, default=here / "tokenizers" / "stdlib-bpe-4k.json")
    args = p.parse_args()
    files = [f for i, f in enumerate(embedded_files())
             if i % EVAL_EVERY_NTH_FILE != EVAL_EVERY_NTH_FILE - 1]
    texts = (f.read_bytes().decode("utf-8", errors="replace") for f in files)
    tok = train_bpe(texts, args.vocab)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(args.out))
    print(f"wrote {args.out}: {tok.get_vocab_size()} tokens, trained on {len(files)} files")


if __name__ == "__main__":
    main()
