"""Run specs with transformers models (hf_config, hf_pretrained) and tokenizer.json data.

Tiny models written as config.json into tmp dirs (no download): LLaMA and GPT-2 with
hidden 32, 2 layers; a 384-token BPE trained on a few stdlib files in well under a second.
"""
from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from gradproj.train.checks import SpecError  # noqa: E402
from gradproj.train.cli import main  # noqa: E402
from gradproj.train.loop import Trainer  # noqa: E402
from gradproj.train.metrics import read_metrics  # noqa: E402
from gradproj.train.spec import load_spec  # noqa: E402
from gradproj.train.tokenizer import train_bpe  # noqa: E402

CONFIGS = {
    "llama": transformers.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, max_position_embeddings=64),
    "gpt2": transformers.GPT2Config(vocab_size=512, n_embd=32, n_layer=2, n_head=2,
                                    n_positions=64),  # dropout 0.1: resume must restore the RNG
}

SPEC = """
[model]
{model}

[data]
{data}
seq_len = 32

[optimizer]
lr = 1e-2

[optimizer.lowrank]
projector = "randomized"
rank = 8
update_gap = 3
targets = {targets}

[train]
steps = 6
batch_size = 4
threads = 1
eval_batches = 2
warmup_steps = 1

[checkpoint]
dir = "{run_dir}"
every = 3

[log]
every = 1
progress = false
plot = false
"""


def docs_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    json_pkg = Path(sysconfig.get_paths()["stdlib"]) / "json"
    for f in sorted(json_pkg.glob("*.py")):
        shutil.copy(f, folder / (f.stem + ".txt"))
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("hf")
    out = {"docs": docs_folder(tmp)}
    for name, cfg in CONFIGS.items():
        cfg.to_json_file(tmp / f"{name}.json")
        out[name] = tmp / f"{name}.json"
    texts = [f.read_text() for f in sorted(out["docs"].glob("*.txt"))]
    train_bpe(texts, vocab_size=384).save(str(tmp / "tok.json"))
    out["tok"] = tmp / "tok.json"
    return out


def write(tmp_path: Path, model: str, data: str, targets: str = '["attn", "mlp"]',
          name: str = "spec.toml", run: str = "run") -> Path:
    path = tmp_path / name
    path.write_text(SPEC.format(model=model, data=data, targets=targets,
                                run_dir=tmp_path / run))
    return path


def losses(run_dir: Path) -> dict[int, tuple]:
    return {r["step"]: (r.get("loss/train"), r.get("loss/eval"))
            for r in read_metrics(run_dir) if r["step"] > 0}


def train_and_resume(spec: Path, run_dir: Path) -> tuple[dict, dict]:
    assert main(["train", str(spec)]) == 0
    full = losses(run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step-6")  # resume from step 3
    assert main(["resume", str(run_dir)]) == 0
    return full, losses(run_dir)


@pytest.mark.parametrize("arch,targets,projected", [
    ("llama", '["all-linear"]', 2 * 7 + 1),       # q k v o gate up down per layer, and lm_head
    ("gpt2", '["attn", "mlp"]', 2 * 4),           # Conv1D c_attn c_proj c_fc c_proj per layer
])
def test_hf_config_trains_and_resumes_exactly(tmp_path, files, arch, targets, projected):
    spec_path = write(tmp_path, f'hf_config = "{files[arch]}"', f'tokenizer = "{files["tok"]}"\n'
                      f'source = "text"\npath = "{files["docs"]}"', targets)
    spec = load_spec(spec_path)
    assert spec.model.vocab_size == 384  # the tokenizer's, not the config's 512
    trainer = Trainer(spec)
    low = [p for g in trainer.opt.param_groups if g["lowrank"] for p in g["params"]]
    assert len(low) == projected
    assert type(trainer.model.hf).__name__ == ("LlamaForCausalLM" if arch == "llama"
                                               else "GPT2LMHeadModel")
    full, resumed = train_and_resume(spec_path, tmp_path / "run")
    assert resumed == full and len(full) == 6
    assert full[6][0] < full[1][0]
    saved = (tmp_path / "run" / "spec.toml").read_text()
    assert "vocab_size = 384" in saved and f'tokenizer = "{files["tok"]}"' in saved


def test_tokenizer_json_batches_equal_gradproj_tokenize_bin(tmp_path, files):
    bin_path = tmp_path / "docs.bin"
    assert main(["tokenize", str(files["docs"]), "-o", str(bin_path),
                 "--tokenizer", str(files["tok"])]) == 0
    ids = np.fromfile(bin_path, dtype=np.uint16)
    assert ids.size > 2000 and ids.max() < 384
    model = 'preset = "tiny"\ndim = 32\nn_layers = 2\nn_heads = 2\nffn_dim = 64'
    text = load_spec(write(tmp_path, model, f'tokenizer = "{files["tok"]}"\nsource = "text"\n'
                                            f'path = "{files["docs"]}"', name="a.toml", run="a"))
    tokens = load_spec(write(tmp_path, model, f'tokenizer = "{files["tok"]}"\nsource = "tokens"\n'
                                              f'path = "{bin_path}"', name="b.toml", run="b"))
    assert text.model.vocab_size == tokens.model.vocab_size == 384
    a, b = Trainer(text), Trainer(tokens)
    for step in range(4):
        for split in ("train_data", "eval_data"):
            xa, ya = getattr(a, split).batch(step)
            xb, yb = getattr(b, split).batch(step)
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a.run()["final_eval_loss"] == b.run()["final_eval_loss"]


def test_hf_pretrained_fine_tunes_from_local_safetensors(tmp_path, files):
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(CONFIGS["llama"])
    model.save_pretrained(tmp_path / "pre")
    spec = load_spec(write(tmp_path, f'hf_pretrained = "{tmp_path / "pre"}"',
                           f'tokenizer = "{files["tok"]}"\nsource = "text"\n'
                           f'path = "{files["docs"]}"'))
    trainer = Trainer(spec)
    for (name, a), b in zip(model.state_dict().items(), trainer.model.state_dict().values()):
        assert torch.equal(a, b), name  # the saved weights, not a fresh init
    assert trainer.run()["steps"] == 6


def test_hf_spec_mistakes_are_one_line_each(tmp_path, files):
    (tmp_path / "bad.json").write_text('{"model_type": "no-such-model"}')
    (tmp_path / "empty").mkdir()
    cases = {
        f'hf_config = "{files["llama"]}"\ndim = 64': "[model].dim: is set by the transformers config",
        f'hf_config = "{tmp_path / "bad.json"}"': "model_type 'no-such-model' is not one transformers",
        f'hf_pretrained = "{tmp_path / "empty"}"': "has no config.json",
        f'hf_config = "{files["llama"]}"\nvocab_size = 100': "expected >= the tokenizer's 384 ids",
    }
    for model, fragment in cases.items():
        path = write(tmp_path, model, f'tokenizer = "{files["tok"]}"')
        with pytest.raises(SpecError) as info:
            load_spec(path)
        assert fragment in str(info.value) and len(info.value.issues) == 1, str(info.value)
    path = write(tmp_path, f'hf_config = "{files["llama"]}"', 'tokenizer = "missing.json"')
    with pytest.raises(SpecError, match=r"\[data\]\.tokenizer: expected \"bytes\" or an existing"):
        load_spec(path)
    seq = write(tmp_path, f'hf_config = "{files["gpt2"]}"', "").read_text()
    (tmp_path / "seq.toml").write_text(seq.replace("seq_len = 32", "seq_len = 128"))
    with pytest.raises(SpecError, match="max_position_embeddings 64, got 128"):
        load_spec(tmp_path / "seq.toml")


def test_gpt2_tied_head_is_saved_once_and_loads(tmp_path, files):
    spec = load_spec(write(tmp_path, f'hf_config = "{files["gpt2"]}"', ""))
    model = Trainer(spec).model
    assert "lm_head.weight" not in model.state_dict()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert not model.load_state_dict(model.state_dict()).missing_keys
    assert json.loads((files["gpt2"]).read_text())["model_type"] == "gpt2"


@pytest.mark.parametrize("tokenizer", ["tok", "bytes"])
def test_tokenize_jsonl_is_the_stream_a_jsonl_run_reads(tmp_path, files, tokenizer):
    from gradproj.train.data import load_jsonl
    from gradproj.train.tokenizer import load_tokenizer

    name = str(files["tok"]) if tokenizer == "tok" else "bytes"
    records = [{"text": f.read_text()} for f in sorted(files["docs"].glob("*.txt"))]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["tokenize", str(tmp_path / "d.jsonl"), "-o", str(tmp_path / "d.bin"),
                 "--tokenizer", name]) == 0
    corpus = load_jsonl(tmp_path / "d.jsonl", "text", 0.1, load_tokenizer(name))
    written = np.fromfile(tmp_path / "d.bin", dtype=np.uint16)
    assert np.array_equal(written, np.concatenate([corpus.train, corpus.eval]))
