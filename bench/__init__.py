"""Benchmarks run as scripts (`python -m bench.<name>`); each reports ratios against a baseline measured in the same run."""
from __future__ import annotations

import json


def emit(result: dict, out: str | None) -> dict:
    """Print a bench's result as JSON and, with `out`, write it there too."""
    print(json.dumps(result, indent=2))
    if out:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result
