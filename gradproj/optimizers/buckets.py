"""Buckets: the parameters of a group that step together, and their states seen as one.

A bucket holds the parameters of one group that share (low-rank or not, shape, dtype,
device, INT8 or dense); with the group's plugins that fixes the side and the low-rank
shape, so everything a step computes for them has one shape and can be stacked along a
new leading dimension: k gradients become one k×m×n tensor, k projections one batched
matmul, k Adam updates one elementwise pass. A LLaMA block has 3–4 such shapes, so a
32-layer model steps in a handful of buckets, and the number of ops a step dispatches
does not grow with the number of layers.

`StackedState` presents the k per-parameter state dicts of a bucket as one mapping whose
tensor entries are the k entries stacked. The stack is kept: each parameter's entry is
replaced by a view of it (`stack[i]`), so later steps read and update the moments and
bases in place with no copy, and `optimizer.state[p]` stays the place that holds
everything (checkpoints, the memory accounting and per-weight steps read it as before).
When an entry is replaced (a refresh stores a new basis, a moment reset allocates new
moments, `load_state_dict`), the next access sees that its view is gone and stacks that
key again. A bucket of one needs no stack: its entries are `entry.unsqueeze(0)` views.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Bucket:
    """Parameters of one group that step as one, and the stacks of their state.

    Usually the whole bucket steps together; where its parameters' rule steps differ
    (moments reset at different refreshes) it steps in subsets (`members`, indices into
    `params`), each with stacks of its own.
    """

    params: list[torch.Tensor]
    low_rank: bool
    side: str | None = None          # projection side (low-rank buckets)
    stacks: dict[tuple[int, ...], dict] = field(default_factory=dict)

    def state(self, members: tuple[int, ...], states: list[dict]) -> "StackedState":
        stacks = self.stacks.get(members)
        if stacks is None:  # a new subset: the stacks of subsets it overlaps lose their views
            for other in [m for m in self.stacks if not set(m).isdisjoint(members)]:
                del self.stacks[other]
            stacks = self.stacks[members] = {}
        return StackedState(states, stacks)


class StackedState:
    """The state dicts of k same-shape parameters as one mapping (see module docstring).

    Tensor entries read as the k entries stacked (k×…); plain scalars read as the first
    parameter's (the optimizer puts parameters in one `StackedState` only where the
    scalars a plugin reads — the rule's step, the moment origin — agree). Writing a
    tensor with a leading dimension k stores one slice per parameter; writing a scalar
    stores it in every state. A key is present when every state holds it.
    """

    def __init__(self, states: list[dict], stacks: dict | None = None):
        self.states = states
        self.stacks = {} if stacks is None else stacks

    def __len__(self) -> int:
        return len(self.states)

    def __contains__(self, key: str) -> bool:
        return all(key in s for s in self.states)

    def get(self, key: str, default=None):
        return self[key] if key in self else default

    def __getitem__(self, key: str):
        first = self.states[0][key]
        if not torch.is_tensor(first):
            return first
        if len(self.states) == 1:
            return first.unsqueeze(0)
        cached = self.stacks.get(key)
        if cached is not None and all(s[key] is view for s, view in zip(self.states, cached[1])):
            return cached[0]
        stack = torch.stack([s[key] for s in self.states])
        self._install(key, stack)
        return stack

    def __setitem__(self, key: str, value) -> None:
        if not torch.is_tensor(value):
            for s in self.states:
                s[key] = value
            return
        if value.dim() == 0 or value.shape[0] != len(self.states):
            raise ValueError(f"state entry {key!r} of a bucket of {len(self.states)} must have "
                             f"a leading dimension {len(self.states)}, got {tuple(value.shape)}")
        if len(self.states) == 1:
            self.states[0][key] = value[0]
            return
        self._install(key, value)

    def _install(self, key: str, stack: torch.Tensor) -> None:
        views = stack.unbind(0)
        for s, view in zip(self.states, views):
            s[key] = view
        self.stacks[key] = (stack, views)
