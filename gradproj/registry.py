"""One generic plugin registry and one instance per plugin kind.

A plugin is a class (or function) registered under a name with a decorator::

    @PROJECTORS.register("svd", aliases=("exact",))
    class SVDProjector(Projector):
        '''Exact SVD of the current gradient (GaLore).'''

The first docstring line is the one-line description `gradproj list` prints.
Third-party packages register through the entry-point group ``gradproj.plugins``:
each entry point names a module (or callable) whose import registers its plugins.
"""
from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass
from typing import Any, Callable, Iterator

ENTRY_POINT_GROUP = "gradproj.plugins"


class UnknownNameError(KeyError, ValueError):
    """An unknown plugin name; a KeyError (mapping lookup) and a ValueError (bad option)."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Entry:
    name: str
    obj: Any
    aliases: tuple[str, ...]
    description: str


def _first_line(obj: Any) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0].strip() if doc else ""


class Registry:
    """Name → plugin mapping for one plugin kind (projector, rule, ...)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, *, aliases: tuple[str, ...] = (),
                 description: str | None = None) -> Callable[[Any], Any]:
        """Class/function decorator; registering a taken name or alias raises ValueError."""

        def decorator(obj: Any) -> Any:
            self.add(name, obj, aliases=aliases, description=description)
            return obj

        return decorator

    def add(self, name: str, obj: Any, *, aliases: tuple[str, ...] = (),
            description: str | None = None) -> None:
        for key in (name, *aliases):
            if key in self._entries or key in self._aliases:
                raise ValueError(f"{self.kind} {key!r} is already registered "
                                 f"(by {self._describe_owner(key)})")
        self._entries[name] = Entry(name, obj, tuple(aliases), description or _first_line(obj))
        for alias in aliases:
            self._aliases[alias] = name
        if hasattr(obj, "__dict__") and isinstance(obj, type):
            obj.registry_name = name

    def _describe_owner(self, key: str) -> str:
        entry = self._entries.get(self._aliases.get(key, key))
        obj = entry.obj if entry else None
        return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"

    def canonical(self, name: str) -> str:
        """The registered name for `name` or one of its aliases; raises UnknownNameError."""
        if name in self._entries:
            return name
        if name in self._aliases:
            return self._aliases[name]
        known = sorted(self._entries) + sorted(self._aliases)
        close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
        raise UnknownNameError(f"unknown {self.kind} {name!r}; {hint}"
                               f"available: {', '.join(self.names())}")

    def get(self, name: str) -> Any:
        return self._entries[self.canonical(name)].obj

    def entry(self, name: str) -> Entry:
        return self._entries[self.canonical(name)]

    def create(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[Entry]:
        return (self._entries[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


PROJECTORS = Registry("projector")
RULES = Registry("rule")
STATE_FORMATS = Registry("state format")
RESIDUALS = Registry("residual")
KERNELS = Registry("kernel")
PRESETS = Registry("preset")
PARAMETRIZATIONS = Registry("parametrization")  # weight-side model transforms

ALL_REGISTRIES: dict[str, Registry] = {
    "projectors": PROJECTORS, "rules": RULES, "state_formats": STATE_FORMATS,
    "residuals": RESIDUALS, "kernels": KERNELS, "presets": PRESETS,
    "parametrizations": PARAMETRIZATIONS,
}

_plugins_loaded = False


def load_plugins() -> list[str]:
    """Import every module of the ``gradproj.plugins`` entry-point group once.

    Returns the names of the entry points loaded. A plugin that fails to import raises
    an ImportError naming the entry point, so a broken plugin is never silently absent.
    """
    global _plugins_loaded
    if _plugins_loaded:
        return []
    _plugins_loaded = True
    from importlib.metadata import entry_points

    loaded = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            target = ep.load()
        except Exception as exc:  # a plugin's own failure, reported with its name
            raise ImportError(f"gradproj plugin {ep.name!r} ({ep.value}) failed to load: {exc}") from exc
        if callable(target) and not isinstance(target, type):
            target()  # an entry point may name a `register()` function instead of a module
        loaded.append(ep.name)
    return loaded
