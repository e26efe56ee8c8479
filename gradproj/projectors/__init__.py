"""Built-in projectors; importing this package registers them."""
from . import base, gaussian, int4, randomized, sparse, svd  # noqa: F401
from .base import PROJ_TYPES, Projector, resolve_side

__all__ = ["PROJ_TYPES", "Projector", "resolve_side"]
