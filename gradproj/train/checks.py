"""Value checks for run-spec fields and the error type that collects their failures.

A `Check` knows what it expects ("an integer >= 1"), how to test a TOML value and how to
convert it (lists to tuples). `SpecError` carries every problem found in a spec, each as
one line `FILE: [table].key: expected ..., got ...; did you mean ...?`, so a user fixes
them all in one pass and the CLI never shows a traceback.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable


@dataclass(frozen=True)
class Issue:
    place: str    # "[train].steps", "--set train.steps", "line 3, column 9"
    message: str

    def line(self, source: str) -> str:
        return f"{source}: {self.place}: {self.message}"


class SpecError(ValueError):
    """Every problem found in one spec; str() is one line per problem."""

    def __init__(self, source: str, issues: Iterable[Issue]):
        self.source = source
        self.issues = list(issues)
        super().__init__("\n".join(i.line(source) for i in self.issues))


def type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "table"
    return type(value).__name__


def show(value: Any) -> str:
    """A value as the user wrote it in TOML, with its type: `'100' (string)`."""
    text = repr(value) if not isinstance(value, dict) else "{" + ", ".join(value) + "}"
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type_name(value)})"


def did_you_mean(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), sorted(set(options)), n=3, cutoff=0.5)
    return f"; did you mean {' or '.join(map(repr, close))}?" if close else ""


@dataclass(frozen=True)
class Check:
    expected: str | Callable[[], str]  # callable: registry names are read when checked
    ok: Callable[[Any], bool]
    convert: Callable[[Any], Any] = lambda v: v
    options: Callable[[], Iterable[str]] | None = None  # names for "did you mean"

    def __call__(self, value: Any) -> tuple[Any, str | None]:
        """(converted value, None) or (None, one-line complaint)."""
        if self.ok(value):
            return self.convert(value), None
        hint = did_you_mean(value, self.options()) if self.options and isinstance(value, str) else ""
        return None, f"expected {self.describe()}, got {show(value)}{hint}"

    def describe(self) -> str:
        return self.expected() if callable(self.expected) else self.expected


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bounds(lo, hi, lo_open=False) -> str:
    parts = []
    if lo is not None:
        parts.append(f"> {lo}" if lo_open else f">= {lo}")
    if hi is not None:
        parts.append(f"<= {hi}")
    return " and ".join(parts)


def integer(lo: int | None = None, hi: int | None = None) -> Check:
    text = "an integer" + (f" {_bounds(lo, hi)}" if lo is not None or hi is not None else "")
    return Check(text, lambda v: _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi))


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Check:
    text = "a finite number" + (f" {_bounds(lo, hi, lo_open)}" if lo is not None or hi is not None else "")

    def ok(v):
        return (_is_num(v) and (lo is None or (v > lo if lo_open else v >= lo))
                and (hi is None or v <= hi))
    return Check(text, ok, float)


def boolean() -> Check:
    return Check("true or false", lambda v: isinstance(v, bool))


def string() -> Check:
    return Check("a non-empty string", lambda v: isinstance(v, str) and bool(v))


def choice(*options: str) -> Check:
    return Check("one of " + ", ".join(map(repr, options)), lambda v: v in options,
                 options=lambda: options)


def registry_name(registry) -> Check:
    """A name (or alias) registered now in `registry`: plugins added later work unchanged."""
    return Check(lambda: f"a registered {registry.kind} ({', '.join(registry.names())})",
                 lambda v: isinstance(v, str) and v in registry, options=registry.names)


def string_list(min_len: int = 1) -> Check:
    return Check(f"an array of at least {min_len} non-empty string(s)",
                 lambda v: isinstance(v, list) and len(v) >= min_len
                 and all(isinstance(s, str) and s for s in v), tuple)


def optional(check: Check) -> Check:
    """`check`, or the TOML-less "none" (TOML has no null: the string "none" means unset)."""
    return Check(lambda: f"{check.describe()} or \"none\"", lambda v: v == "none" or check.ok(v),
                 lambda v: None if v == "none" else check.convert(v), check.options)


def spec_field(default: Any, check: Check, doc: str = "") -> Any:
    """A dataclass field carrying its check and one-line documentation."""
    return field(default=default, metadata={"check": check, "doc": doc})
