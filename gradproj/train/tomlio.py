"""Reading TOML with one-line errors, `--set a.b=value` overrides, and writing TOML back.

The standard library reads TOML (tomllib, Python >= 3.11; tomli before) but cannot
write it; the resolved spec only holds strings, numbers, booleans, arrays and tables,
so the writer below covers exactly that. Floats are written with repr(), which
round-trips every float64 bit-exactly (inf and nan are valid TOML floats).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from .checks import Issue, SpecError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def read_toml(path: Path) -> dict:
    """Parse `path`; a missing file or a syntax error raises SpecError naming line and column."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(source, [Issue("file", "no such file")]) from None
    except IsADirectoryError:
        raise SpecError(source, [Issue("file", "is a folder; expected a .toml run spec")]) from None
    except UnicodeDecodeError as exc:
        raise SpecError(source, [Issue("file", f"not UTF-8 text ({exc.reason} at byte "
                                               f"{exc.start})")]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(source, [_syntax_issue(str(exc))]) from None


def _syntax_issue(message: str) -> Issue:
    match = re.search(r"\(at line (\d+), column (\d+)\)", message)
    where = f"line {match.group(1)}, column {match.group(2)}" if match else "TOML"
    reason = message[:match.start()].strip() if match else message
    return Issue(where, f"TOML syntax error: {reason}")


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """`train.steps=50` -> (("train", "steps"), 50). The value is TOML; a bare word that is
    not valid TOML (`rule=lion`) is taken as a string so shells need no extra quoting."""
    if "=" not in text:
        raise ValueError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.steps=50")
    key, raw = (part.strip() for part in text.split("=", 1))
    path = tuple(key.split("."))
    if len(path) < 2 or not all(_BARE_KEY.match(p) for p in path):
        raise ValueError(f"--set {text!r}: expected a dotted key TABLE.KEY (e.g. train.steps), "
                         f"got {key!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        if not raw or not re.match(r"^[A-Za-z0-9_./:+-]+$", raw):
            raise ValueError(f"--set {key}: {raw!r} is not a TOML value "
                             f"(quote strings: --set {key}='\"text\"')") from None
        value = raw
    return path, value


def apply_overrides(raw: dict, overrides: list[tuple[tuple[str, ...], Any]]) -> set[tuple[str, ...]]:
    """Set each override into the nested dict; returns the overridden key paths."""
    for path, value in overrides:
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"--set {'.'.join(path)}: {part!r} is a value, not a table")
            node = child
        node[path[-1]] = value
    return {path for path, _ in overrides}


# -- writing -------------------------------------------------------------------
def _key(k: str) -> str:
    return k if _BARE_KEY.match(k) else _string(k)


def _string(s: str) -> str:
    out = s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{out}"'


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(data: dict, header: str = "") -> str:
    """TOML text for nested tables of plain values; `header` lines become comments."""
    lines = [f"# {line}" for line in header.splitlines()]

    def table(name: str, node: dict) -> None:
        plain = {k: v for k, v in node.items() if not isinstance(v, dict) or not v or name == ""}
        subs = {k: v for k, v in node.items() if k not in plain}
        if name:
            lines.append("")
            lines.append(f"[{name}]")
        for k, v in plain.items():
            lines.append(f"{_key(k)} = {_value(v)}")
        for k, v in subs.items():
            table(f"{name}.{_key(k)}" if name else _key(k), v)

    top = {k: v for k, v in data.items() if not isinstance(v, dict)}
    for k, v in top.items():
        lines.append(f"{_key(k)} = {_value(v)}")
    for k, v in data.items():
        if isinstance(v, dict):
            table(_key(k), v)
    return "\n".join(lines).lstrip("\n") + "\n"
