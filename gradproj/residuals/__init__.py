"""Built-in residual policies; importing this package registers them."""
from . import apollo, base, fira, frugal  # noqa: F401
from .base import Residual

__all__ = ["Residual"]
