"""The welore parametrization and `gradproj compress`: ranks from the weights, the compressed
file round trip, fine-tuning that trains only the factors, the planner to the byte, errors."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import gradproj as gp
from gradproj.memory import gradient_bytes, optimizer_bytes, weight_bytes
from gradproj.memory.accounting import parametrization_bytes
from gradproj.optimizers import optimizer_state_nbytes
from gradproj.parametrizations import apply_parametrization, linear_module_names, welore_rank
from gradproj.parametrizations.welore import WeLore, compressed_metadata, read_ranks
from gradproj.train.cli import main
from gradproj.train.model import build_model, model_config

CFG = model_config("tiny", n_layers=2)  # dim 128, ffn 344: 14 targeted matrices


@torch.no_grad()
def shaped_model(seed: int = 0) -> torch.nn.Module:
    """The tiny model with spectra WeLore can tell apart: attention matrices decay fast
    (s_i = 0.9^i: low-rank components), MLP ones stay as initialised (flat: dense)."""
    model = build_model(CFG, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".attn." in name:
            u, _ = torch.linalg.qr(torch.randn(m.out_features, 128, generator=gen))
            v, _ = torch.linalg.qr(torch.randn(m.in_features, 128, generator=gen))
            m.weight.copy_((u * 0.9 ** torch.arange(128.0)) @ v.T)
    return model


def compress_to(path: Path, ratio: float = 0.15) -> WeLore:
    model, param = shaped_model(), WeLore(ratio=ratio)
    apply_parametrization(model, param, linear_module_names(model, ("attn", "mlp")))
    save_file(dict(model.state_dict()), str(path), metadata=compressed_metadata(param))
    return param


def test_compression_follows_the_spectra_and_the_layers_compute_their_dense_form():
    model = shaped_model()
    names = linear_module_names(model, ("attn", "mlp"))
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    layers = apply_parametrization(model, {"kind": "welore", "ratio": 0.15}, names)
    kinds = {n: m.low_rank for n, m in layers.items()}
    assert all(kinds[n] for n in names if ".attn." in n)          # fast decay: factors
    assert not any(kinds[n] for n in names if ".mlp." in n)       # flat: dense, frozen
    dense = sum(w.numel() for w in weights.values())
    kept = sum(m.A.numel() + m.B.numel() if m.low_rank else m.weight.numel() for m in layers.values())
    assert 1 - kept / dense >= 0.15
    for n, m in layers.items():
        if m.low_rank:  # the best rank-k approximation of the weight it replaced
            b, a = welore_rank.factorize(weights[n], m.kept)
            torch.testing.assert_close(m.dense_weight(), b @ a)
            assert m.B.requires_grad and m.A.requires_grad and m.projected == ()
        else:
            assert torch.equal(m.weight, weights[n]) and not m.weight.requires_grad
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {f"{n}.{t}" for n in names if kinds[n] for t in ("B", "A")}  # factors only
    assert torch.isfinite(model(x, x))


def test_compressed_file_rebuilds_the_model_exactly(tmp_path):
    path = tmp_path / "c.safetensors"
    param = compress_to(path)
    info = read_ranks(path)
    assert info["ranks"] == param.ranks and info["compression"] >= 0.15
    fresh = build_model(CFG, seed=9)  # other weights: all must come from the file
    apply_parametrization(fresh, {"kind": "welore", "compressed": str(path)},
                          linear_module_names(fresh, ("attn", "mlp")))
    saved = load_file(str(path))
    got = fresh.state_dict()
    assert set(got) == set(saved) and all(torch.equal(got[k], saved[k]) for k in saved)


def test_planner_accounts_weights_factors_and_states_of_a_real_step(tmp_path):
    path = tmp_path / "c.safetensors"
    param = compress_to(path)
    table = {"kind": "welore", "compressed": str(path), "project_factors": True}
    options = dict(rank=4, state_format="q8", lr=1e-3)

    def build(device):
        model = build_model(CFG, device=device)
        return model, gp.build_optimizer(model, "galore", parametrization=table, **options)

    meta, meta_opt = build("meta")
    shapes = {n: (m.out_features, m.in_features) for n, m in build_model(CFG, device="meta")
              .named_modules() if isinstance(m, torch.nn.Linear) and (".attn." in n or ".mlp." in n)}
    factors = 4 * sum(k * sum(shapes[n]) for n, k in param.ranks.items() if k)
    frozen = 4 * sum(shapes[n][0] * shapes[n][1] for n, k in param.ranks.items() if not k)
    assert parametrization_bytes(meta) == {"factors": factors, "frozen": frozen}
    model, opt = build("cpu")
    assert weight_bytes(meta) == weight_bytes(model)
    tokens = torch.randint(0, CFG.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    model(tokens, tokens).backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    assert gradient_bytes(meta_opt) == grads == factors  # only the factors take gradients
    opt.step()
    assert optimizer_bytes(meta_opt).total == optimizer_state_nbytes(opt)


def test_options_are_checked():
    with pytest.raises(ValueError, match="option 'ratio' must be a number in \\(0, 1\\), got 1"):
        WeLore(ratio=1)
    with pytest.raises(ValueError, match="option 'train_rest' must be true or false"):
        WeLore(train_rest="yes")
    with pytest.raises(ValueError, match="option 'compressed' must name a file"):
        apply_parametrization(build_model(CFG, device="meta"),
                              {"kind": "welore", "compressed": "/nonexistent.safetensors"},
                              ["layers.0.attn.q_proj"])
    with pytest.raises(ValueError, match="meta device"):
        apply_parametrization(build_model(CFG, device="meta"), {"kind": "welore"},
                              ["layers.0.attn.q_proj"])


SPEC = """
[model]
preset = "tiny"
dim = 32
n_layers = 2
n_heads = 2
ffn_dim = 64
{param}
[data]
seq_len = 16
[optimizer]
rule = "adamw"
lr = {lr}
[optimizer.lowrank]
projector = "svd"
rank = 4
[train]
steps = {steps}
batch_size = 4
eval_batches = 2
[checkpoint]
dir = "{dir}"
every = 0
[log]
progress = false
plot = false
"""


def test_compress_command_then_fine_tune_only_the_factors(tmp_path, capsys):
    spec = tmp_path / "train.toml"
    spec.write_text(SPEC.format(param="", lr=1e-2, steps=20, dir=tmp_path / "run"))
    assert main(["compress", str(spec)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert main(["train", str(spec)]) == 0
    out = tmp_path / "c.safetensors"
    assert main(["compress", str(spec), "--ratio", "0.5", "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("compressed 14 matrices") and line.endswith(f"wrote {out}")
    assert 50.0 <= float(re.search(r"\(([\d.]+)% less\)", line).group(1)) < 51.0
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["welore"])["ratio"] == 0.5

    ft = tmp_path / "ft.toml"
    ft.write_text(SPEC.format(param=f'[model.parametrization]\nkind = "welore"\n'
                                    f'compressed = "{out}"\n', lr=1e-3, steps=3, dir=tmp_path / "ft"))
    assert main(["train", str(ft)]) == 0
    before = load_file(str(out))
    after = load_file(str(tmp_path / "ft" / "checkpoints" / "step-3" / "model.safetensors"))
    assert set(after) == set(before)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    factors = {k for k in before if k.endswith((".A", ".B"))}
    assert moved == factors and factors  # fine-tuning trained the factors and nothing else

    for args, message in (([str(spec), "--ratio", "1.5"], "--ratio must be a number in (0, 1)"),
                          ([str(spec), "--ratio", "0.999"], "--ratio 0.999 is out of reach"),
                          ([str(ft)], "compress a run with dense weights")):
        assert main(["compress", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: compress:") and message in err and "\n" not in err
