"""Data sources and the LLaMA model."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from gradproj.train.data import (EVAL_EVERY_NTH_FILE, Batches, DataError, embedded_files,
                                 load_embedded, load_jsonl, load_text, load_tokens)
from gradproj.train.model import build_model, count_parameters, model_config, rotary_table, apply_rotary


@pytest.fixture(scope="module")
def corpus():
    return load_embedded()


def test_embedded_corpus_is_real_deterministic_and_split_by_file(corpus):
    files = embedded_files()
    assert files == sorted(files) and len(files) >= EVAL_EVERY_NTH_FILE
    held = [f for i, f in enumerate(files) if i % EVAL_EVERY_NTH_FILE == EVAL_EVERY_NTH_FILE - 1]
    assert corpus.eval.size == sum(f.stat().st_size for f in held)
    assert corpus.train.size + corpus.eval.size == sum(f.stat().st_size for f in files)
    assert b"def " in corpus.train[:200_000].tobytes()
    assert load_embedded().digest == corpus.digest
    # Python source in bytes: far from uniform (log 256 = 5.55 nats), far from trivial
    assert 2.5 < corpus.unigram_entropy() < 4.0


def test_batches_are_a_pure_function_of_seed_step_micro(corpus):
    a = Batches(corpus.train, 64, 4, seed=3, vocab_size=256, split="train")
    b = Batches(corpus.train, 64, 4, seed=3, vocab_size=256, split="train")
    x1, y1 = a.batch(7, 1)
    x2, y2 = b.batch(7, 1)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the next tokens
    assert not torch.equal(a.batch(7, 0)[0], x1) and not torch.equal(a.batch(8, 1)[0], x1)
    other = Batches(corpus.train, 64, 4, seed=4, vocab_size=256, split="train")
    assert not torch.equal(other.batch(7, 1)[0], x1)


def test_embedded_split_holds_out_every_20th_file_exactly(corpus):
    """Independent of data.py's constants: sorted stdlib files, indices 19, 39, 59, ... are
    eval (5 %), the rest train, each split the files' bytes concatenated in name order."""
    import sysconfig
    from pathlib import Path

    files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if p.is_file())
    held, kept = files[19::20], [f for i, f in enumerate(files) if i % 20 != 19]
    assert corpus.eval.tobytes() == b"".join(f.read_bytes() for f in held)
    assert corpus.train.tobytes() == b"".join(f.read_bytes() for f in kept)
    assert len(held) == len(files) // 20


@pytest.mark.parametrize("size,fraction,eval_size", [(1000, 0.1, 100), (1001, 0.1, 101), (50, 0.5, 25),
                                                     (7, 0.01, 1)])
def test_fraction_split_is_a_clean_cut(tmp_path, size, fraction, eval_size):
    """Text and JSONL: the last ceil(n·fraction) tokens are eval, the rest train, no
    token in both and none lost."""
    data = bytes((i * 37) % 251 for i in range(size))
    (tmp_path / "a.txt").write_bytes(data)
    text = load_text(tmp_path / "a.txt", "*", fraction)
    assert text.eval.tobytes() == data[size - eval_size:]
    assert text.train.tobytes() == data[:size - eval_size]
    ids = np.arange(size, dtype=np.uint16)
    ids.tofile(tmp_path / "t.bin")
    tok = load_tokens(tmp_path / "t.bin", None, "uint16", 1 << 16, fraction)
    assert np.array_equal(tok.train, ids[:size - eval_size]) and np.array_equal(tok.eval, ids[size - eval_size:])


def test_batch_windows_are_slices_of_the_tokens_up_to_the_last_one():
    """Each row is tokens[s:s+L] with targets tokens[s+1:s+L+1]; every start 0..n−L−1 is
    drawn, so the last token is reachable (with n = L + 2 only s = 0 and s = 1 exist)."""
    tokens = np.arange(10, dtype=np.int64) * 3
    seq_len = 8
    batches = Batches(tokens, seq_len, 4, seed=0, vocab_size=256, split="train")
    starts = set()
    for step in range(30):
        x, y = batches.batch(step)
        for row_x, row_y in zip(x.tolist(), y.tolist()):
            s = row_x[0] // 3
            starts.add(s)
            assert row_x == tokens[s:s + seq_len].tolist() and row_y == tokens[s + 1:s + seq_len + 1].tolist()
    assert starts == {0, 1}


def test_unigram_entropy_is_add_one_cross_entropy_on_eval():
    from gradproj.train.data import Corpus

    train = np.array([0, 0, 0, 1, 2, 2], dtype=np.uint8)
    held = np.array([0, 1, 3], dtype=np.uint8)
    corpus = Corpus(train, held, 4, "test", "x")
    probs = {0: 4 / 10, 1: 2 / 10, 2: 3 / 10, 3: 1 / 10}  # (count + 1) / (6 + 4)
    expected = -(math.log(probs[0]) + math.log(probs[1]) + math.log(probs[3])) / 3
    assert corpus.unigram_entropy() == pytest.approx(expected, rel=1e-12)


def test_text_jsonl_and_token_sources(tmp_path):
    (tmp_path / "docs").mkdir()
    for i in range(3):
        (tmp_path / "docs" / f"{i}.txt").write_text(f"document {i} " * 50)
    text = load_text(tmp_path / "docs", "**/*.txt", 0.1)
    assert text.train.size + text.eval.size == 3 * len("document 0 ") * 50
    assert text.eval.size == math.ceil(0.1 * (text.train.size + text.eval.size))

    lines = [json.dumps({"text": f"record {i}"}) for i in range(20)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n\n")
    jl = load_jsonl(tmp_path / "d.jsonl", "text", 0.2)
    assert bytes(np.concatenate([jl.train, jl.eval])).startswith(b"record 0\nrecord 1\n")

    ids = np.arange(5000, dtype=np.uint32) % 1000
    ids.tofile(tmp_path / "train.bin")
    ids[:300].tofile(tmp_path / "val.bin")
    tok = load_tokens(tmp_path / "train.bin", tmp_path / "val.bin", "uint32", 1000, 0.1)
    assert tok.train.size == 5000 and tok.eval.size == 300
    x, y = Batches(tok.train, 16, 2, 0, 1000, "train").batch(0)
    assert int(y.max()) < 1000
    with pytest.raises(DataError, match="token id"):
        Batches(tok.train, 16, 2, 0, 10, "train").batch(0)  # windows of 17 ids from 0..999
    (tmp_path / "odd.bin").write_bytes(b"abc")
    with pytest.raises(DataError, match="whole number"):
        load_tokens(tmp_path / "odd.bin", None, "uint16", 1000, 0.1)


def test_paper_shapes_on_meta_device():
    # LLaMA-7B has 6.74B parameters (Touvron et al. 2023); GaLore's 60M config ~58M
    assert count_parameters(build_model(model_config("7b"), device="meta")) == 6_738_415_616
    assert 55e6 < count_parameters(build_model(model_config("60m"), device="meta")) < 60e6
    cfg = model_config("tiny")
    tied = model_config("tiny", tie_embeddings=True)
    assert count_parameters(build_model(cfg)) - count_parameters(build_model(tied)) == 256 * 128


def test_rotary_scores_depend_only_on_relative_position():
    table = rotary_table(16, 32, 10000.0)
    q, k = torch.randn(16), torch.randn(16)

    def score(i, j):
        qs = apply_rotary(q.expand(1, 1, 32, 16).contiguous(), table)[0, 0, i]
        ks = apply_rotary(k.expand(1, 1, 32, 16).contiguous(), table)[0, 0, j]
        return float(qs @ ks)

    assert score(5, 2) == pytest.approx(score(20, 17), rel=1e-4, abs=1e-5)
    assert score(0, 0) == pytest.approx(float(q @ k), rel=1e-5)


def test_activation_checkpointing_gives_the_same_gradients():
    cfg = model_config("tiny", dim=32, n_layers=2, n_heads=2, ffn_dim=64)
    x = torch.randint(0, 256, (2, 17))
    grads = []
    for ckpt in (False, True):
        model = build_model(cfg, seed=1, activation_checkpointing=ckpt)
        model(x[:, :-1], x[:, 1:]).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_grouped_query_attention_shapes():
    cfg = model_config("tiny", dim=64, n_heads=4, n_kv_heads=2, ffn_dim=64, n_layers=1)
    model = build_model(cfg)
    assert model.layers[0].attn.k_proj.weight.shape == (32, 64)
    x = torch.randint(0, 256, (2, 9))
    assert torch.isfinite(model(x[:, :-1], x[:, 1:]))


def test_every_example_spec_loads():
    from pathlib import Path

    from gradproj.train.spec import load_spec

    examples = sorted((Path(__file__).parents[2] / "examples").glob("*.toml"))
    assert any(p.name == "tiny.toml" for p in examples)
    for path in examples:
        spec = load_spec(path)
        assert spec.resolved()["optimizer"]["lowrank"]["targets"], path


def test_batches_need_seq_len_plus_two_tokens():
    """A split of exactly seq_len + 1 tokens has no (input, target) pair to spare: refused by
    name (catches a `< seq_len + 1` bound that lets it through to a torch.randint error)."""
    with pytest.raises(DataError, match="seq_len"):
        Batches(np.arange(9, dtype=np.int64), 8, 2, seed=0, vocab_size=256, split="train")
    x, y = Batches(np.arange(10, dtype=np.int64), 8, 2, seed=0, vocab_size=256, split="train").batch(0)
    assert x.shape == y.shape == (2, 8)


def test_a_token_id_equal_to_vocab_size_is_refused():
    """Ids run 0..vocab_size-1, so an id == vocab_size is out of range (catches `>` for `>=`)."""
    tokens = np.full(12, 16, dtype=np.int64)  # every window holds id 16
    with pytest.raises(DataError, match="token id 16"):
        Batches(tokens, 8, 1, seed=0, vocab_size=16, split="eval").batch(0)
    Batches(tokens, 8, 1, seed=0, vocab_size=17, split="eval").batch(0)  # 16 < 17: fine
