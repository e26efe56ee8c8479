"""The GaLore preset reproduces galore-torch's GaLoreAdamW update rule exactly (fp32)."""
import math

import pytest
import torch

import gradproj as gp


def galore_torch_reference(weight, grads, *, rank, gap, scale, lr, betas, eps, wd):
    """galore-torch 1.0's GaLoreAdamW, spelled out: SVD basis refreshed when step % gap == 0
    (pre-increment), side by proj_type "std", Adam on the projected gradient with the bias
    correction folded into the step size, back-projection × scale, then decoupled decay."""
    w = weight.clone()
    m_rows, n_cols = w.shape
    exp_avg = exp_avg_sq = ortho = None
    for step, g in enumerate(grads):
        if step % gap == 0:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            ortho = vh[:rank, :] if m_rows >= n_cols else u[:, :rank]
        low = g @ ortho.T if m_rows >= n_cols else ortho.T @ g
        if exp_avg is None:
            exp_avg, exp_avg_sq = torch.zeros_like(low), torch.zeros_like(low)
        exp_avg = betas[0] * exp_avg + (1 - betas[0]) * low
        exp_avg_sq = betas[1] * exp_avg_sq + (1 - betas[1]) * low * low
        t = step + 1
        step_size = lr * math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t)
        norm = exp_avg / (exp_avg_sq.sqrt() + eps)
        back = (norm @ ortho if m_rows >= n_cols else ortho @ norm) * scale
        w = w - step_size * back
        w = w - lr * wd * w
    return w


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
def test_galore_adamw_matches_galore_torch(shape):
    torch.manual_seed(0)
    steps, gap = 7, 3  # refreshes at steps 0, 3, 6
    weight = torch.randn(shape)
    grads = [torch.randn(shape) for _ in range(steps)]
    hyper = dict(rank=6, gap=gap, scale=0.25, lr=1e-2, betas=(0.9, 0.999), eps=1e-6, wd=0.1)
    expected = galore_torch_reference(weight, grads, **hyper)

    param = torch.nn.Parameter(weight.clone())
    opt = gp.GaLoreAdamW([{"params": [param], "rank": 6, "update_proj_gap": gap, "scale": 0.25,
                           "proj_type": "std"}], lr=1e-2, weight_decay=0.1)
    for g in grads:
        param.grad = g.clone()
        opt.step()
    assert opt.state[param]["refreshes"] == 3
    assert (param.detach() - expected).abs().max().item() <= 1e-6


def test_full_rank_matches_torch_adamw():
    """With rank >= min(m, n) the projection is the identity; the step is AdamW's."""
    torch.manual_seed(1)
    weight = torch.randn(12, 20)
    ours = torch.nn.Parameter(weight.clone())
    theirs = torch.nn.Parameter(weight.clone())
    with pytest.warns(UserWarning, match="full rank"):
        opt = gp.LowRankOptimizer([{"params": [ours], "rank": 12}], lr=1e-3, scale=1.0,
                                  eps=1e-8, weight_decay=0.0)
        ref = torch.optim.AdamW([theirs], lr=1e-3, eps=1e-8, weight_decay=0.0)
        for _ in range(5):
            g = torch.randn(12, 20)
            ours.grad, theirs.grad = g.clone(), g.clone()
            opt.step()
            ref.step()
    # the two differ only in where eps enters the bias correction (eps vs eps·sqrt(1-b2^t)),
    # a relative difference below eps / sqrt(v) ~ 1e-8 for unit-scale gradients
    assert (ours - theirs).abs().max().item() <= 1e-6
