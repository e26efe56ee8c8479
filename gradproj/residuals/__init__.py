"""Built-in residual policies; importing this package registers them."""
from . import base  # noqa: F401
from .base import Residual

__all__ = ["Residual"]
