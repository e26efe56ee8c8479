"""Run-spec checks for `[data] tokenizer` and `[model] hf_config` / `hf_pretrained`.

`out` is the spec's issue collector (`spec._Collector`): every problem is one line naming
`[table].key`, collected with the others before anything runs.
"""
from __future__ import annotations

from pathlib import Path

from .hfmodel import HFModelSpec, check_pretrained, read_config
from .model import ModelConfig
from .tokenizer import BYTES, load_tokenizer, token_dtype


def tokenizer_vocab(data: dict, given: dict, out) -> int | None:
    """The vocabulary of a tokenizer.json (None for bytes, or when it cannot be read)."""
    if data["tokenizer"] == BYTES:
        return None
    if not Path(data["tokenizer"]).is_file():
        out.add("data", "tokenizer", f"expected \"bytes\" or an existing tokenizer.json, got "
                                     f"{given['tokenizer']!r} (no such file: {data['tokenizer']})")
        return None
    try:
        vocab = load_tokenizer(data["tokenizer"]).vocab_size
    except ValueError as exc:
        out.add("data", "tokenizer", str(exc))
        return None
    if data["source"] == "tokens" and token_dtype(vocab) == "uint32" and data["dtype"] == "uint16":
        out.add("data", "dtype", f"expected 'uint32' for a tokenizer of {vocab} ids, got 'uint16'")
    return vocab


def check_hf_model(values: dict, data: dict, token_vocab: int | None, base_dir: Path,
                    out) -> HFModelSpec | ModelConfig:
    both = "hf_config" in values and "hf_pretrained" in values
    if both:
        out.add("model", "hf_pretrained", "expected hf_config or hf_pretrained, not both")
    key = "hf_pretrained" if "hf_pretrained" in values else "hf_config"
    for other in sorted(set(values) - {"hf_config", "hf_pretrained", "vocab_size"}):
        out.add("model", other, f"is set by the transformers config with {key}; remove it")
    path = (base_dir / values[key]).expanduser().resolve()
    try:
        if key == "hf_pretrained":
            check_pretrained(path)
        config = read_config(path / "config.json" if key == "hf_pretrained" else path)
    except ValueError as exc:
        out.add("model", key, str(exc))
        return ModelConfig()
    vocab = values.get("vocab_size") or token_vocab or config.vocab_size
    if key == "hf_pretrained" and vocab != config.vocab_size and "vocab_size" in values:
        out.add("model", "vocab_size", f"expected the pretrained model's {config.vocab_size} "
                                       f"(its embeddings are not resized), got {vocab}")
    if key == "hf_pretrained":
        vocab = config.vocab_size
    if token_vocab and vocab < token_vocab:
        out.add("model", "vocab_size", f"expected >= the tokenizer's {token_vocab} ids, got "
                                       f"{vocab} (from {'the model' if key == 'hf_pretrained' else 'the spec'})")
    elif data["source"] != "tokens" and not token_vocab and vocab < 256:
        out.add("model", "vocab_size", f"expected >= 256 for byte-level {data['source']!r} data, "
                                       f"got {vocab} (from {path.name})")
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions < data["seq_len"]:
        out.add("data", "seq_len", f"expected <= the model's max_position_embeddings "
                                   f"{positions}, got {data['seq_len']}")
    return HFModelSpec(config=str(path) if key == "hf_config" else None,
                       pretrained=str(path) if key == "hf_pretrained" else None, vocab_size=vocab,
                       width=int(getattr(config, "hidden_size", 0) or 0))
