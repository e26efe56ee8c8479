"""What an optimizer's state holds: refresh and fallback counts, exact tensor bytes."""
from __future__ import annotations

import torch


def count_refreshes(optimizer: torch.optim.Optimizer) -> int:
    """Total subspace refreshes so far, over all parameters (metric `subspace/refreshes`)."""
    return sum(s.get("refreshes", 0) for s in optimizer.state.values())


def count_svd_fallbacks(optimizer: torch.optim.Optimizer) -> int:
    """Total SVD failures that fell back to the range finder."""
    return sum(s.get("svd_fallbacks", 0) for s in optimizer.state.values())


def optimizer_state_nbytes(optimizer: torch.optim.Optimizer) -> int:
    """Exact bytes of every tensor in the optimizer's state."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values()
               for v in s.values() if torch.is_tensor(v))
