"""The `[model.parametrization]` table of a run spec: which weight-side transform, its options.

    [model.parametrization]
    kind = "lora"        # a PARAMETRIZATIONS name (`gradproj list parametrizations`)
    rank = 8             # ... and that plugin's own options (its `defaults`)

The plugin's own `validate` checks the options while the spec loads; a problem is
reported as `[model.parametrization].key: ...`. The resolved table (every default filled
in) is what the run folder's spec.toml keeps and what `OptimizerSpec.build` applies.
"""
from __future__ import annotations

import re
from typing import Any

from ..registry import PARAMETRIZATIONS
from .checks import did_you_mean

TABLE = "model.parametrization"
_OPTION = re.compile(r"option '([A-Za-z0-9_]+)'")


def parse_parametrization(raw: Any, out) -> dict | None:
    """The checked table {"kind": name, **options}, or None (problems go to `out`)."""
    if not isinstance(raw, dict):
        out.add(TABLE, None, f"expected a table, got {type(raw).__name__}")
        return None
    options = dict(raw)
    kind = options.pop("kind", None)
    names = PARAMETRIZATIONS.names()
    if kind is None:
        out.add(TABLE, "kind", f"expected a parametrization name ({', '.join(names)}), got nothing")
        return None
    if not isinstance(kind, str) or kind not in PARAMETRIZATIONS:
        out.add(TABLE, "kind", f"expected one of: {', '.join(names)}, got {kind!r}"
                               f"{did_you_mean(str(kind), names)}")
        return None
    try:
        param = PARAMETRIZATIONS.create(kind, **options)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        match = _OPTION.search(message)
        key = match.group(1) if match else None
        if match:
            message = message.replace(f"{match.group(0)} must be", "expected", 1)
        out.add(TABLE, key, message)
        return None
    return {"kind": PARAMETRIZATIONS.canonical(kind), **param.options}


__all__ = ["TABLE", "parse_parametrization"]
