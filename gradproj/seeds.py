"""Every seed the optimizer draws from, derived in one place from the group's `seed`.

A parameter's seed is fixed by its position among the optimizer's parameters, so every
process of a distributed run (and a resumed run) derives the same one; each refresh and
each stochastic rounding mixes in the step, so every draw is new but reproducible.
"""
from __future__ import annotations

SEED_STRIDE = 1_000_003  # a prime larger than any parameter count, so the mix is invertible


def param_seed(group_seed: int, index: int) -> int:
    """The seed of the `index`-th parameter of the optimizer (state["seed"])."""
    return int(group_seed) * SEED_STRIDE + int(index)


def param_index(seed: int) -> int:
    """The parameter index a `param_seed` was made from."""
    return int(seed) % SEED_STRIDE


def refresh_seed(seed: int, step: int) -> int:
    """The projector's seed for a refit at `step` (the pre-increment count)."""
    return int(seed) * SEED_STRIDE + int(step)


def rounding_seed(seed: int, step: int) -> int:
    """The stochastic-rounding seed of an INT8 weight's update at `step`."""
    return (int(seed) * SEED_STRIDE + int(step) * 7_919 + 17) % (1 << 62)



def zo_seed(seed: int, k: int) -> int:
    """The seed of the k-th SPSA perturbation of a zeroth-order run (train/zeroth_order.py)."""
    return (int(seed) * SEED_STRIDE + int(k) * 104_729 + 31) % (1 << 62)


def zo_param_seed(perturbation_seed: int, index: int) -> int:
    """The seed of the index-th parameter's z within one perturbation."""
    return (int(perturbation_seed) * SEED_STRIDE + int(index)) % (1 << 62)
