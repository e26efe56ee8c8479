"""Built-in update rules; importing this package registers them."""
from . import adabelief, adafactor, adamp, adamw, diffgrad, lamb, lion, sgdm, sophia  # noqa: F401
from .base import Rule

__all__ = ["Rule"]
