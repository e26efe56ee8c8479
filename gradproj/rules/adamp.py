"""AdamP (Heo et al., ICLR 2021, "AdamP: Slowing Down the Slowdown for Momentum Optimizers
on Scale-invariant Weights")."""
from __future__ import annotations

import math

import torch

from ..kernels import cpu_rowdots
from ..registry import RULES
from .base import Rule, adam_bias_correction, check_betas, check_flag, check_positive, rule_step


@RULES.register("adamp")
class AdamP(Rule):
    """Adam whose update loses its radial part on scale-invariant weights (wd × wd_ratio there).

    p = m̂/(√v̂ + ε) (Nesterov: (β1·m + (1−β1)·g)/…); for a weight of ≥ 2 dims, under the
    channel view (rows W_i) and then the layer view (W flattened): if max |cos(G_i, W_i)| <
    δ/√(view dim), W is taken as scale-invariant: p ← p − Ŵ·⟨Ŵ, p⟩ per view row
    (Ŵ = W/(‖W‖ + ε)) and the decay becomes wd·wd_ratio. W ← W − lr·(p + wd'·W), which is
    the official `adamp` package's W(1 − lr·wd') − lr·p. The first view that detects wins.
    In a low-rank group p is the full-size update the weight receives (back-projection and
    residual applied) and the cosine is taken with the full gradient G; where the step only
    has G's projection (per-layer mode accumulating R) the update stands in for G.
    ε is the paper's and the package's, added to √v̂: m̂/(√v̂ + ε) = c·m/(√v + ε·√(1−β2ᵗ))
    with c = √(1−β2ᵗ)/(1−β1ᵗ), so the format's fused Adam pass runs it with ε·√(1−β2ᵗ)
    (galore-torch's convention, ε beside √v, differs by up to ε/√v relative: 3e-4 for
    a gradient of 1e-3 at step 1 — 2.5e-5 on the weights of a 25-step test run).
    """

    defaults = {"betas": (0.9, 0.999), "eps": 1e-8, "delta": 0.1, "wd_ratio": 0.1,
                "nesterov": False}
    moments = (("exp_avg", True), ("exp_avg_sq", False))
    batched = True
    finishes_update = True

    def validate(self, group):
        check_betas(group)
        check_positive(group, "eps", allow_zero=True)
        check_positive(group, "delta")
        ratio = group.get("wd_ratio")
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 <= ratio <= 1:
            raise ValueError(f"option 'wd_ratio' must be a number in [0, 1], got {ratio!r}")
        check_flag(group, "nesterov")

    def step_scale(self, t, group):
        return adam_bias_correction(group["betas"], t)

    def update(self, grad, state, group, fmt):
        beta1, beta2 = group["betas"]
        t = rule_step(state)
        eps, scale = group["eps"] * math.sqrt(1.0 - beta2 ** t), self.step_scale(t, group)
        if not group["nesterov"]:  # the format's fused Adam pass
            return fmt.adam_step(state, "exp_avg", "exp_avg_sq", grad, beta1, beta2, eps, scale)
        exp_avg, exp_avg_sq = fmt.read(state, "exp_avg"), fmt.read(state, "exp_avg_sq")
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        fmt.write(state, "exp_avg", exp_avg)
        fmt.write(state, "exp_avg_sq", exp_avg_sq)
        lookahead = exp_avg.mul(beta1).add_(grad, alpha=1.0 - beta1)
        return lookahead.div_(exp_avg_sq.sqrt().add_(eps)).mul_(scale)

    def finish_update(self, weights, update, grad, group):
        wd = float(group["weight_decay"])
        if weights.dim() <= 2:  # vectors (the stack adds one dim): plain decoupled decay
            return update.add_(weights, alpha=wd) if wd else update
        signal = update if grad is None else grad
        update, _ = project_scale_invariant(weights, update, signal, group["delta"],
                                            group["eps"], wd, group["wd_ratio"])
        return update


def project_scale_invariant(weights: torch.Tensor, update: torch.Tensor, grad: torch.Tensor,
                            delta: float, eps: float, weight_decay: float = 0.0,
                            wd_ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """AdamP's projection over a k×… stack, decay included: (p' + wd'·W, k bools: slice
    detected scale-invariant), wd' = wd·wd_ratio on the detected slices and wd on the others.
    `update` is overwritten (where its reshape is a view; the result is returned either way).

    Views, in order: channel (k×out×rest) then layer (k×1×all); a slice takes the first
    view whose max |cos| is below δ/√(view width) and keeps its update otherwise.

    Both views come from the same four row reductions, ⟨G,W⟩, ‖G‖, ‖W‖ and ⟨W,p⟩ per
    channel (a layer's are their sums, or root sums of squares), and the projection is one pass,
    p − W·⟨W,p⟩/(‖W‖ + ε)² with the chosen view's norms — which is p − Ŵ·⟨Ŵ,p⟩ with
    Ŵ = W/(‖W‖ + ε). The cosine is F.cosine_similarity's: ⟨G,W⟩/(max(‖G‖, ε)·max(‖W‖, ε)).
    The decay joins the projection's coefficient, p + W·(wd' − ⟨W,p⟩/(‖W‖ + ε)²): one
    pass for both, into U itself. (Spelled out view by view it was 2 × 10 passes over the
    stack, 4.1× AdamW's host time in benchmarks/overhead.py --quick; these 7 passes were
    1.9×, same run; with the decay folded in and U written in place the step takes 0.70×
    that time, 1.29–1.44× AdamW's in stop 22's run.)"""
    k, rows = len(weights), weights.shape[1]
    w, g, u = (x.reshape(k, rows, -1) for x in (weights, grad, update))
    sums = cpu_rowdots.row_dots(g, w, u)  # on CPU one C pass for the four (cpu_rowdots.py)
    if sums is not None:
        gw, g_square, w_square, wu = sums.unbind(2)
        g_norm, w_norm = g_square.sqrt(), w_square.sqrt()
    else:
        product = torch.empty_like(w)  # one buffer for both dot products' elementwise pass
        gw = torch.mul(g, w, out=product).sum(2)
        wu = torch.mul(w, u, out=product).sum(2)
        g_norm, w_norm = (torch.linalg.vector_norm(x, dim=2) for x in (g, w))
    cosine = gw.abs() / (g_norm.clamp_min(eps) * w_norm.clamp_min(eps))
    channel = cosine.amax(dim=1) < delta / math.sqrt(w.shape[2])
    g_layer, w_layer = (x.square().sum(1).sqrt() for x in (g_norm, w_norm))
    cosine = gw.sum(1).abs() / (g_layer.clamp_min(eps) * w_layer.clamp_min(eps))
    layer = cosine < delta / math.sqrt(w[0].numel())  # taken where channel is not (below)
    radial = torch.where(channel.view(k, 1), wu / (w_norm + eps).square(),
                         torch.where(layer.view(k, 1),
                                     wu.sum(1, keepdim=True) / (w_layer + eps).square().view(k, 1),
                                     torch.zeros_like(wu)))
    invariant = channel | layer
    decay = torch.where(invariant, weight_decay * wd_ratio, weight_decay)
    u.addcmul_(w, (decay.view(k, 1) - radial).unsqueeze(2))  # the step's own U: in place
    return u.reshape(update.shape), invariant
