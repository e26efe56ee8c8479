"""Built-in projectors; importing this package registers them."""
from . import base, int4, randomized, svd  # noqa: F401
from .base import PROJ_TYPES, Projector, resolve_side

__all__ = ["PROJ_TYPES", "Projector", "resolve_side"]
