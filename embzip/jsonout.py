"""JSON as strict parsers read it: what `--json`, bench.json and a model directory's manifest are written with.

Python's json module writes a non-finite float as `Infinity` or `NaN`, which JSON does not have: JavaScript's
JSON.parse, jq and most other parsers refuse the whole document. A perplexity can overflow to infinity (a
model whose logits blow up), so every such number is written as null instead, and anything json cannot
write itself (a path, a dtype) as its str().
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite(value: Any) -> Any:
    """`value` with every non-finite float, at any depth of dicts, lists and tuples, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """json.dumps of `finite(value)`: never `Infinity` or `NaN`; objects json cannot write become their str()."""
    return json.dumps(finite(value), allow_nan=False, default=str, **kwargs)
