"""LoRA-GA: after its init, the first step of B·A is full fine-tuning's first step, truncated
to rank 2r (the paper's Theorem, for SGD), and the model's function is unchanged."""
import pytest
import torch
import torch.nn.functional as F

import gradproj as gp
from gradproj.parametrizations import apply_parametrization, initialize_parametrization
from gradproj.parametrizations.lora_ga import LoRAGA

M, N, R = 40, 48, 4
EPS = torch.finfo(torch.float32).eps


def designed_gradient(decay: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """G = U·diag(σ)·Vᵀ with σ_i = decay^i (i = 0..39), and its exact SVD's σ."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(M, M, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(N, M, generator=gen, dtype=torch.float64))
    s = decay ** torch.arange(M, dtype=torch.float64)
    return (u * s) @ v.T, s


def truncate(g: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def one_sgd_step(table, grad: torch.Tensor, lr: float):
    """A layer whose loss ⟨W, G⟩ has gradient exactly G (input I, target weights Gᵀ);
    LoRA-GA init, one SGD step on (A, B); returns the dense weight's change split into its
    first-order part (α/r)(ΔB·A + B·ΔA) and the whole change, and the layer."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(N, M, bias=False))
    x, t = torch.eye(N), grad.float().T.contiguous()
    loss_of = lambda i: (model(x) * t).sum()  # noqa: E731
    apply_parametrization(model, table, ["0"])
    before_out = None
    with torch.no_grad():
        w0 = model[0].weight.clone()
        before_out = F.linear(x, w0)
    initialize_parametrization(model, table, loss_of)
    layer = model[0]
    out_after_init = model(x).detach()
    a0, b0, dense0 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone(), layer.dense_weight().detach()
    opt = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=lr)
    loss_of(0).backward()
    opt.step()
    da, db = layer.lora_A.detach() - a0, layer.lora_B.detach() - b0
    first = layer.scaling * (db @ a0 + b0 @ da)
    # what rounding and second order may add: (α/r)·‖ΔB‖‖ΔA‖ + a few ulps of the dense weight
    layer.rest_bound = layer.scaling * db.norm() * da.norm() + 4 * EPS * dense0.norm()
    return first, layer.dense_weight().detach() - dense0, layer, (out_after_init - before_out)


def test_init_leaves_the_function_unchanged():
    grad, _ = designed_gradient(0.7)
    _, _, layer, changed = one_sgd_step({"kind": "lora-ga", "rank": R, "batches": 1}, grad, 0.0)
    offset = layer.scaling * (layer.lora_B @ layer.lora_A).detach()
    assert offset.abs().max() > 1e-3  # a real offset: the factors are not zero
    # (W − sBA) + sBA: two roundings of values up to max|W| + max|sBA| (x = I: no sums)
    assert changed.abs().max() <= 2 * EPS * (layer.weight.abs().max() + 2 * offset.abs().max())


@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr", "ArBr"])
def test_first_step_is_the_best_rank_2r_approximation_of_full_fine_tuning(direction):
    grad, s = designed_gradient(0.7)
    lr, alpha = 1e-3, 8.0
    table = {"kind": "lora-ga", "rank": R, "alpha": alpha, "batches": 1, "direction": direction}
    first, whole, layer, _ = one_sgd_step(table, grad, lr)
    c2 = M ** 0.5 / 16.0  # stable scale: A, B × m^¼/√γ
    full_step = -lr * grad            # full fine-tuning's first SGD step on W
    want = (alpha / R) ** 2 * c2 * truncate(full_step, 2 * R)
    # fp32 SVD: subspace error ~ eps·σ₁/(σ₂ᵣ − σ₂ᵣ₊₁) (Wedin), times a few for the products
    tol = 64 * EPS * (s[0] / (s[2 * R - 1] - s[2 * R])).item()
    err = (first.double() - want).norm() / want.norm()
    assert err <= tol, (err, tol)
    # the truncation is what it claims: rank 2r is much closer than rank r or rank 2r + 2
    for k in (R, 2 * R + 2):
        other = (alpha / R) ** 2 * c2 * truncate(full_step, k)
        assert (first.double() - other).norm() / other.norm() > 100 * tol
    # the rest of the step is its second-order part (α/r)·ΔB·ΔA, O(lr²), and rounding
    assert (whole - first).norm() <= layer.rest_bound


@pytest.mark.parametrize("direction, a_rows, b_cols", [
    ("ArB2r", range(0, R), range(R, 2 * R)), ("A2rBr", range(R, 2 * R), range(0, R)),
    ("ArBr", range(1, 2 * R, 2), range(0, 2 * R, 2))])
def test_each_direction_takes_the_authors_singular_vectors(direction, a_rows, b_cols):
    """Which of the top 2r singular vectors go to A (right ones, as rows) and to B (left
    ones, as columns), as the authors' code splits them; any split of 2r distinct vectors
    passes the first-step test above, so the split itself is pinned here (|cos| = 1)."""
    grad, _ = designed_gradient(0.7)
    _, _, layer, _ = one_sgd_step({"kind": "lora-ga", "rank": R, "batches": 1,
                                   "direction": direction}, grad, 0.0)
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    a = layer.lora_A.detach().double()
    b = layer.lora_B.detach().double()
    cos_a = ((a / a.norm(dim=1, keepdim=True)) * vh[list(a_rows)]).sum(1).abs()
    cos_b = ((b / b.norm(dim=0, keepdim=True)) * u[:, list(b_cols)]).sum(0).abs()
    assert (cos_a > 1 - 1e-4).all() and (cos_b > 1 - 1e-4).all(), (cos_a, cos_b)


@pytest.mark.parametrize("power_iters", [0, 1])
def test_randomized_projector_is_as_good_as_its_range_finder(power_iters):
    """`randomized` (a range finder, for large layers) on a slowly decaying spectrum
    (σ_i = 0.8^i): the error stays under the range finder's own accuracy,
    (σ_{2r+p+1}/σ_{2r})^(2q+1) for oversampling p and q power iterations (Halko,
    Martinsson & Tropp 2011, §10), and it is a real approximation (worse than exact)."""
    grad, s = designed_gradient(0.8)
    p = 8
    table = {"kind": "lora-ga", "rank": R, "batches": 1, "projector": "randomized",
             "projector_options": {"oversample": p, "power_iters": power_iters}}
    first, _, _, _ = one_sgd_step(table, grad, 1e-3)
    want = (16.0 / R) ** 2 * (M ** 0.5 / 16.0) * truncate(-1e-3 * grad, 2 * R)
    err = ((first.double() - want).norm() / want.norm()).item()
    bound = (s[2 * R + p] / s[2 * R - 1]).item() ** (2 * power_iters + 1)
    assert err <= bound, (err, bound)
    exact, _, _, _ = one_sgd_step({"kind": "lora-ga", "rank": R, "batches": 1}, grad, 1e-3)
    assert ((exact.double() - want).norm() / want.norm()).item() < err / 10


def test_stable_scale_and_the_weight_offset():
    grad, _ = designed_gradient(0.7)
    _, _, layer, _ = one_sgd_step({"kind": "lora-ga", "rank": R, "batches": 1, "scale": "stable",
                                   "stable_gamma": 4.0}, grad, 0.0)
    c = M ** 0.25 / 4.0 ** 0.5
    gram = layer.lora_A.detach() @ layer.lora_A.detach().T  # rows of Vᵀ times c: c²·I
    torch.testing.assert_close(gram, c * c * torch.eye(R), atol=1e-5, rtol=0)


@pytest.mark.parametrize("scale", ["gd", "unit"])
def test_gd_and_unit_scales(scale):
    """"gd": A, B ÷ (α/r) (α 8, r 4: rows of Vᵀ halved); "unit": the singular vectors as they are."""
    grad, _ = designed_gradient(0.7)
    _, _, layer, _ = one_sgd_step({"kind": "lora-ga", "rank": R, "batches": 1, "scale": scale,
                                   "alpha": 8.0}, grad, 0.0)
    c = 1 / (8.0 / R) if scale == "gd" else 1.0
    for gram in (layer.lora_A.detach() @ layer.lora_A.detach().T,
                 layer.lora_B.detach().T @ layer.lora_B.detach()):
        torch.testing.assert_close(gram, c * c * torch.eye(R), atol=1e-5, rtol=0)


def test_bad_options_name_the_key():
    with pytest.raises(ValueError, match="option 'direction' must be one of"):
        LoRAGA(direction="BA")
    with pytest.raises(ValueError, match="unknown projector 'svdd'; did you mean 'svd'"):
        LoRAGA(projector="svdd")
    with pytest.raises(ValueError, match="option 'oversample' must be"):
        LoRAGA(projector="randomized", projector_options={"oversample": -1})
    with pytest.raises(ValueError, match=r"option 'rank' must be <= min\(in, out\)/2 = 4"):
        gp.apply_parametrization(torch.nn.Sequential(torch.nn.Linear(8, 8)), {"kind": "lora-ga", "rank": 5}, ["0"])


def test_trainer_initialises_a_fresh_run_only(tmp_path, monkeypatch):
    """A fresh run calls the init once, with the first batches; a resume loads the
    checkpoint instead (re-initialising would move W and A, B off the saved run)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
    from trainhelpers import MICRO_SPEC
    from gradproj.train.loop import Trainer
    from gradproj.train.spec import load_spec
    calls = []
    original = LoRAGA.initialize

    def spy(self, model, modules, loss_of):
        calls.append(len(modules))
        return original(self, model, modules, loss_of)

    monkeypatch.setattr(LoRAGA, "initialize", spy)
    text = MICRO_SPEC.replace("[data]", '[model.parametrization]\nkind = "lora-ga"\nrank = 4\nbatches = 2\n\n[data]')
    path = tmp_path / "spec.toml"
    path.write_text(text.replace("{run_dir}", str(tmp_path / "run")).replace("steps = 8", "steps = 4"))
    spec = load_spec(path)
    Trainer(spec).run()
    assert calls == [14]  # 2 layers × (4 attention + 3 MLP) projections
    spec = load_spec(path, ["train.steps=6"])
    Trainer(spec, resume=True).run()
    assert calls == [14]
