"""Built-in state formats; importing this package registers them."""
from . import base  # noqa: F401
from .base import StateFormat

__all__ = ["StateFormat"]
