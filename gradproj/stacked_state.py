"""`StackedState`: the state dicts of k same-shape parameters seen as one mapping.

The optimizer's buckets (`optimizers/buckets.py`) hand it to plugins that declare
`batched`, so a plugin method written for one weight's state works on a whole bucket:
tensor entries read as the k entries stacked along a new leading dimension, and the
stack is kept — each parameter's entry is replaced by a view of it (`stack[i]`), so
later steps update it in place with no copy. When an entry is replaced (a refresh stores
a new basis, a moment reset allocates new moments, `load_state_dict`), the next access
sees that its view is gone and stacks that key again. A bucket of one needs no stack:
its entries read as `entry.unsqueeze(0)` views.

It lives below the plugins (they may type-check against it) and above nothing.
"""
from __future__ import annotations

import operator

import torch


class StackedState:
    """The state dicts of k same-shape parameters as one mapping (see module docstring).

    Tensor entries read as the k entries stacked (k×…); plain scalars read as the first
    parameter's (the optimizer puts parameters in one `StackedState` only where the
    scalars a plugin reads — the rule's step, the moment origin — agree; `values(key)`
    gives every parameter's own, e.g. the seeds). Writing a tensor with a leading
    dimension k stores one slice per parameter; writing a scalar stores it in every
    state. A key is present when every state holds it. `scratch` is a dict for values a
    plugin computes once per step and reuses within it (a regenerated basis); `cache` one
    that lives as long as the stacks, for values derived from entries that rarely change
    (a bucket's seeds on the device), each stored with what it was derived from.
    """

    def __init__(self, states: list[dict], stacks: dict | None = None, cache: dict | None = None):
        self.states = states
        self.stacks = {} if stacks is None else stacks
        self.cache = {} if cache is None else cache
        self.scratch: dict = {}

    def cached(self, key, source: tuple, make):
        """`make()`, reused while `source` (plain values) is unchanged."""
        entry = self.cache.get(key)
        if entry is None or entry[0] != source:
            entry = self.cache[key] = (source, make())
        return entry[1]

    def values(self, key: str) -> list:
        """Every parameter's own entry, in bucket order."""
        return [s[key] for s in self.states]

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
        # every state still holds its view of the stack (map/is_: ~1500 checks a step at 24 layers)
        if cached is not None and all(map(operator.is_, map(operator.itemgetter(key), self.states),
                                          cached[1])):
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
