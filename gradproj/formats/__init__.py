"""Built-in state formats; importing this package registers them."""
from . import base, q4, q8  # noqa: F401
from .base import StateFormat

__all__ = ["StateFormat"]
