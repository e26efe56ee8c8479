"""When the subspace is refreshed, and what happens to the moments when it changes.

`refresh = "fixed"`: every `update_gap` steps (GaLore).
`refresh = "adaptive"` (Q-GaLore): at each refresh compare the new basis with the old;
    once the mean similarity of the last `refresh_window` refreshes (5) is at least
    `refresh_threshold` (0.4), double this parameter's gap, up to
    `refresh_max_factor` × update_gap (8×). Q-GaLore measures similarity as the signed
    cosine of the two top singular vectors, so an SVD that returns −u for the same u
    (a coin flip per refresh) reads as −1, "completely changed". We use the cosines of
    the principal angles between the two subspaces — the singular values of
    Q_oldᵀ·Q_new — which ignore signs and rotations inside the subspace; their mean is
    1 for the same subspace, about √(r/d) for unrelated random ones, and for rank 1
    it is |cos| of the top vectors, Q-GaLore's measure with the abs() it lacks.
`moments = "keep"` (GaLore: moments stay in the old coordinates), `"reset"` (FRUGAL:
    zero them and restart the rule's bias correction — without the restart, Adam with
    β2 = 0.999 would take a 3.2× too large first step: 0.1·G/√(0.001·G²)), or
    `"rotate"`: carry them into the new basis. With R' = A·R·B the map between the two
    coordinate systems (A = P_newᵀ·P_old on the left, B = P_oldᵀ·P_new on the right;
    pseudo-inverse corrected for non-orthonormal bases), the first moment maps exactly,
    M' = A·M·B, and the second by V' = (A∘A)·V·(B∘B): E[R'²] when R's coordinates are
    independent with zero mean and variance V. It keeps V ≥ 0, and for orthogonal A, B
    it keeps ΣV. That is `Rule.rotate_moments(state, fmt, A, B)`, which a rule may
    override (Adafactor's factored moments do), as `Rule.reset_moments`.

All the bookkeeping is plain ints plus one small fp32 tensor (the similarity window).
"""
from __future__ import annotations

import torch

from ..projectors.base import low_rank_shape, sides_of
from ..seeds import refresh_seed

REFRESH_POLICIES = ("fixed", "adaptive")
MOMENT_POLICIES = ("keep", "reset", "rotate")

REFRESH_DEFAULTS: dict = {
    "refresh": "fixed",
    "moments": "keep",
    "refresh_window": 5,         # Q-GaLore's queue_size
    "refresh_threshold": 0.4,    # Q-GaLore's cos_threshold
    "refresh_max_factor": 8,     # cap: the gap grows to at most 8 × update_gap
}


def refresh_subspace(plugins: tuple, g: torch.Tensor, state: dict, group: dict, side: str,
                     step: int, dtype: torch.dtype) -> None:
    """Fit a new basis for gradient `g` (m×n fp32) and apply the group's refresh policies."""
    rule, projector, fmt, _ = plugins
    shape = tuple(g.shape)
    adaptive = group["refresh"] == "adaptive"
    first = state["refreshes"] == 0
    old = None
    if not first and (adaptive or group["moments"] == "rotate"):
        old = {one: projector.load_basis(state, one, shape).clone() for one in sides_of(side)}
    projector.fit(g, state, rank=group["rank"], side=side, seed=refresh_seed(state["seed"], step),
                  dtype=dtype)
    state["refreshes"] += 1
    gap = group["update_gap"]
    if adaptive:
        gap = state.get("update_gap", gap)
        if old is not None:
            new = {one: projector.load_basis(state, one, shape) for one in old}
            sim = sum(subspace_similarity(old[k], new[k]) for k in old) / len(old)
            gap = _adapt_gap(state, group, gap, sim, g.device)
        state["update_gap"] = gap
    state["next_refresh"] = step + gap
    if first or group["moments"] == "keep":
        return
    low_shape = low_rank_shape(shape, group["rank"], side)
    if group["moments"] == "reset":
        rule.reset_moments(state, low_shape, g.device, fmt)
        # the rule sees t = 1 on this step: its bias correction restarts with the moments
        state["moments_origin"] = step  # the pre-increment count of the step being taken
        return
    ortho = projector.orthonormal
    left = right = None
    if "left" in old:
        new_left = projector.load_basis(state, "left", shape)
        left = new_left.T @ old["left"] if ortho else new_left.T @ old["left"] @ torch.linalg.pinv(old["left"].T @ old["left"])
    if "right" in old:
        new_right = projector.load_basis(state, "right", shape)
        right = old["right"].T @ new_right if ortho else torch.linalg.pinv(old["right"].T @ old["right"]) @ old["right"].T @ new_right
    rule.rotate_moments(state, fmt, left, right)


def subspace_similarity(old: torch.Tensor, new: torch.Tensor) -> float:
    """Mean cosine of the principal angles between span(old) and span(new) (d×r each), in [0, 1].

    Invariant to the sign and order of basis vectors and to any rotation inside the
    subspace. Non-orthonormal (random) bases are orthonormalised first by QR.
    """
    q_old, _ = torch.linalg.qr(old.float())
    q_new, _ = torch.linalg.qr(new.float())
    cosines = torch.linalg.svdvals(q_old.T @ q_new).clamp_(max=1.0)
    return float(cosines.mean())


def _adapt_gap(state: dict, group: dict, gap: int, sim: float, device) -> int:
    """Push `sim` into this parameter's window; double the gap when the window's mean is high."""
    window = group["refresh_window"]
    sims = state.get("similarities")
    if sims is None or sims.numel() != window:
        sims = torch.zeros(window, dtype=torch.float32, device=device)
        state["similarity_count"] = 0
    sims = torch.roll(sims, -1)
    sims[-1] = sim
    state["similarities"] = sims
    state["similarity_count"] = min(state["similarity_count"] + 1, window)
    if state["similarity_count"] == window and float(sims.mean()) >= group["refresh_threshold"]:
        gap = min(2 * gap, group["refresh_max_factor"] * group["update_gap"])
    return gap


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_refresh(group: dict) -> None:
    """Raise ValueError naming the first bad refresh option and its allowed values."""
    checks = (
        ("refresh", group["refresh"] in REFRESH_POLICIES, f"one of {', '.join(REFRESH_POLICIES)}"),
        ("moments", group["moments"] in MOMENT_POLICIES, f"one of {', '.join(MOMENT_POLICIES)}"),
        ("refresh_window", _is_int(group["refresh_window"]) and group["refresh_window"] >= 1,
         "an integer >= 1"),
        ("refresh_threshold", isinstance(group["refresh_threshold"], (int, float))
         and not isinstance(group["refresh_threshold"], bool)
         and 0.0 <= group["refresh_threshold"] <= 1.0, "a number in [0, 1]"),
        ("refresh_max_factor", _is_int(group["refresh_max_factor"]) and group["refresh_max_factor"] >= 1,
         "an integer >= 1"),
    )
    for name, ok, allowed in checks:
        if not ok:
            raise ValueError(f"option {name!r} must be {allowed}, got {group[name]!r}")
