"""What a step's cache key is made of besides its inputs: the code that computes it.

Prefect's TASK_SOURCE hashes only the task body (a few lines that call a step), so a change inside the step's
own modules would not invalidate the cache; `code_version(step)` hashes those module sources plus the package
version, and every task takes it as an input.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
from pathlib import Path

# Modules whose source decides each step's output (packages: every .py file under them).
STEP_MODULES: dict[str, tuple[str, ...]] = {
    "download": ("pipeline.data.download", "pipeline.data.sources", "pipeline.testing.synthetic"),
    "precompute": ("pipeline.data.precompute", "pipeline.core.schema", "pipeline.core.images", "model.encoders"),
    "train": ("pipeline.train", "model"),
    "sample": ("pipeline.generate", "model"),
    "evaluate": ("pipeline.evaluate.evaluate", "model"),
    "report": ("pipeline.report.report",),
}


def _files(module: str) -> list[tuple[str, Path]]:
    """(name relative to the module, path) of every source file of a module or package."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise ModuleNotFoundError(f"step module {module!r} is not installed")
    if spec.submodule_search_locations:
        return sorted((f"{module}/{p.relative_to(loc).as_posix()}", p)
                      for loc in spec.submodule_search_locations for p in Path(loc).rglob("*.py"))
    return [(module, Path(spec.origin))]


@functools.lru_cache(maxsize=None)
def code_version(step: str) -> str:
    """'<package version>+<sha256 of the step's module sources, 12 hex>'."""
    if step not in STEP_MODULES:
        raise ValueError(f"unknown step {step!r}; expected one of {sorted(STEP_MODULES)}")
    h = hashlib.sha256()
    for module in STEP_MODULES[step]:
        for name, path in _files(module):
            h.update(name.encode() + b"\0")
            h.update(path.read_bytes())
    try:
        version = importlib.metadata.version("microdit")
    except importlib.metadata.PackageNotFoundError:
        version = "0+unknown"
    return f"{version}+{h.hexdigest()[:12]}"
