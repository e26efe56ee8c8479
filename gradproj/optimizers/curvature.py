"""The curvature estimates a rule such as Sophia preconditions with: the extra backward.

`LowRankOptimizer.update_curvature(estimator, ...)` feeds every weight whose rule declares
`uses_curvature` one fresh diagonal estimate ĥ, which the rule folds into its EMA
(`Rule.update_curvature`: h ← β2·h + (1−β2)·ĥ for Sophia). Two estimators (Liu et al.
2023, §2.3):

  "gnb" — Gauss-Newton-Bartlett (Sophia-G). The caller back-propagates the mean loss on
      labels sampled from the model's own logits, L̂ = (1/B)·Σ_b CE(f(θ, x_b), ŷ_b) with
      ŷ_b ~ softmax(f(θ, x_b)) (`sampled_label_loss`), and passes B; then
      ĥ = B·ĝ⊙ĝ from each weight's `.grad` ĝ. Since E[ŷ] = p and Cov(e_ŷ) = diag(p) − ppᵀ =
      S (the softmax's Hessian), independently per b, E[B·ĝ⊙ĝ] = diag((1/B)·Σ_b J_bᵀ S_b J_b):
      exactly the Gauss-Newton diagonal of the mean loss, and ĥ ≥ 0.
  "hutchinson" — the caller passes a loss whose graph is still alive (true labels) and a
      generator; for a Rademacher probe u per weight, Hu comes from a second backward
      through the gradient, and ĥ = u⊙Hu, whose expectation is the Hessian diagonal
      (E[u_i·Σ_j H_ij u_j] = H_ii). It may be negative; Sophia's max(ρ·h, ε) handles that.

In a low-rank group the weight moves in its subspace, W + back(X), and the rule's moments
live in X's coordinates; the curvature the rule needs is that of X: the gradient there is
project(ĝ) and the Hessian back*·H·back, so GNB squares the *projected* ĝ, and Hutchinson
draws u in X's shape, probes H with v = back(u) and reads u⊙project(Hv) (project is the
adjoint of back for every projector here). The basis is the weight's current one; a later
refresh keeps, resets or rotates h with the other moments (optimizers/refresh.py).

A projected weight that has not taken a step has no basis yet: the call raises (take a
step first, as Sophia's own schedule does: the first estimate comes after step k).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..projectors.base import low_rank_shape
from ..quant.linear import is_quantized
from ..stacked_state import StackedState

ESTIMATORS = ("gnb", "hutchinson")


def sampled_label_loss(logits: torch.Tensor, generator: torch.Generator | None = None
                       ) -> tuple[torch.Tensor, int]:
    """(L̂, B): mean cross-entropy of `logits` (…×V) on labels drawn from softmax(logits),
    and the number B of labels drawn (GNB's batch size: tokens, for a language model).
    The draw uses `generator` (on the logits' device), so it is reproducible."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    with torch.no_grad():
        labels = torch.multinomial(flat.softmax(-1), 1, generator=generator).squeeze(1)
    return F.cross_entropy(flat, labels), flat.shape[0]


def curvature_params(opt) -> list[tuple[torch.Tensor, dict]]:
    """(parameter, group) for every parameter whose rule keeps a curvature estimate."""
    pairs = [(p, g) for g in opt.param_groups if opt.plugins(g)[0].uses_curvature
             for p in g["params"]]
    if not pairs:
        rules = sorted({g["rule"] for g in opt.param_groups})
        raise ValueError(f"update_curvature: rule {', '.join(map(repr, rules))} keeps no curvature "
                         f"estimate; only a rule with one (e.g. 'sophia') can use it")
    return pairs


class _Space:
    """The coordinates a weight's moments live in: its own, or its current subspace."""

    def __init__(self, opt, p: torch.Tensor, group: dict):
        from .lowrank import matrix_shape
        self.state = opt._state_of(p, group)
        self.low_rank = opt.is_low_rank(p, group)
        self.param_shape = tuple(p.shape)
        self.shape = self.param_shape  # of the moments (and of ĥ)
        if not self.low_rank:
            return
        if not self.state.get("refreshes"):
            raise ValueError(f"update_curvature: the projected {self.param_shape} weight has no "
                             f"subspace yet; take an optimizer step before estimating curvature")
        self.projector = opt.plugins(group)[1]
        self.side, self.matrix = opt.side(p, group), matrix_shape(p)
        self.shape = low_rank_shape(self.matrix, group["rank"], self.side)

    def _one(self, fn, x):  # a per-weight projector call, as a bucket of one where batched
        if self.projector.batched:
            return fn(x.unsqueeze(0), StackedState([self.state]))[0]
        return fn(x, self.state)

    def project(self, g: torch.Tensor) -> torch.Tensor:
        g = g.float()
        if not self.low_rank:
            return g
        return self._one(lambda x, s: self.projector.project(x, s, self.side),
                         g.reshape(self.matrix))

    def back(self, u: torch.Tensor) -> torch.Tensor:
        if not self.low_rank:
            return u
        return self._one(lambda x, s: self.projector.project_back(x, s, self.side, self.matrix),
                         u).reshape(self.param_shape)


def project_current(opt, p: torch.Tensor, group: dict, grad: torch.Tensor) -> torch.Tensor:
    """ĝ in the coordinates of p's moments (its current subspace in a low-rank group); no
    refresh is fit, unlike `project_grad`: a curvature pass never moves the subspace."""
    return _Space(opt, p, group).project(grad)


@torch.no_grad()
def gnb_update(opt, p: torch.Tensor, group: dict, grad: torch.Tensor, batch_size: int,
               projected: bool = False) -> None:
    """Feed p's rule ĥ = B·ĝ⊙ĝ for its GNB gradient `grad` (already in the moments'
    coordinates when `projected`, e.g. summed over micro-batches by per-layer mode)."""
    rule, _, fmt, _ = opt.plugins(group)
    low = grad.float() if projected else project_current(opt, p, group, grad)
    rule.update_curvature(low.square().mul_(batch_size), opt._state_of(p, group), group, fmt)


def update_curvature(opt, estimator: str = "gnb", *, batch_size: int | None = None,
                     loss: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> None:
    """The body of `LowRankOptimizer.update_curvature` (see the module docstring)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"update_curvature: estimator must be one of {', '.join(ESTIMATORS)}, "
                         f"got {estimator!r}")
    pairs = curvature_params(opt)
    if estimator == "gnb":
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"update_curvature('gnb') needs batch_size, the number B of sampled "
                             f"labels the loss averaged (an integer >= 1), got {batch_size!r}")
        for p, group in pairs:
            if p.grad is not None:
                gnb_update(opt, p, group, p.grad, batch_size)
        return
    if loss is None:
        raise ValueError("update_curvature('hutchinson') needs loss=, a scalar loss whose graph "
                         "is still alive (not yet back-propagated)")
    _hutchinson(opt, pairs, loss, generator)


def _hutchinson(opt, pairs, loss, generator) -> None:
    for p, _ in pairs:
        if is_quantized(p) or not p.requires_grad:
            raise ValueError(f"update_curvature('hutchinson'): the {tuple(p.shape)} weight does not "
                             f"require grad (an INT8 QuantLinear weight?): a Hessian-vector product "
                             f"needs it; use estimator 'gnb'")
    params = [p for p, _ in pairs]
    with torch.enable_grad():
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    spaces = [_Space(opt, p, group) for p, group in pairs]
    probes, vectors, live = [], [], []
    for (p, _), space, g in zip(pairs, spaces, grads):
        u = torch.randint(0, 2, space.shape, generator=generator).float().mul_(2).sub_(1)
        u = u.to(p.device)
        probes.append(u)
        if g is not None and g.requires_grad:  # else the loss is at most linear in p: Hu = 0
            vectors.append(space.back(u).to(g.dtype))
            live.append(len(probes) - 1)
    products = [None] * len(pairs)
    if live:
        hv = torch.autograd.grad([grads[i] for i in live], params, grad_outputs=vectors,
                                 allow_unused=True)
        products = list(hv)
    with torch.no_grad():
        for (p, group), space, u, hv in zip(pairs, spaces, probes, products):
            rule, _, fmt, _ = opt.plugins(group)
            estimate = torch.zeros_like(u) if hv is None else u * space.project(hv)
            rule.update_curvature(estimate, space.state, group, fmt)
