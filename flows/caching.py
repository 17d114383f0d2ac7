"""What a step's cache key is made of besides its inputs: the code that computes it.

Prefect's TASK_SOURCE hashes only the task body (a few lines that call a step), so a change inside the step's
own modules would not invalidate the cache; `code_version(step)` hashes those module sources plus the package
version, and every task takes it as an input.

Which modules count is not kept by hand: it is the transitive import closure, within our own packages, of the
step's entry points, read from the source with `ast` (nothing is imported). Every `import` / `from ... import`
counts wherever it is written: at module level, inside functions (lazy imports), under `if TYPE_CHECKING:`
(over-counting only costs a cache miss). Importing `a.b.c` runs `a/__init__.py` and `a/b/__init__.py`, so
those count too. A step's key also hashes the keys of the steps upstream of it: its output changes when its
inputs' producers change, even though their URIs do not.

Keys are computed once per process and code state (the size and mtime of every source file), under a lock:
CPython 3.11's AST constructor keeps its recursion depth in interpreter-wide state, so two threads parsing at
once (two flow runs in one serve process) can fail with "AST constructor recursion depth mismatch"
(python/cpython#106905).

    python -m flows.caching [--root DIR] [-v]    # each step's key, upstream steps and module closure
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.metadata
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.plan.run import STEPS as PLAN_STEPS

PACKAGES = ("model", "pipeline", "flows", "cli")  # imports of anything else (torch, ray, stdlib) are not followed
ROOT = Path(__file__).resolve().parents[1]  # the folder holding the three packages (repo or site-packages)
# How registries name what they import lazily (model/family.py REGISTRY, model/encoders LOADERS): "pkg.mod:attr".
LAZY_SPEC = re.compile(r"[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)+:[A-Za-z_][A-Za-z0-9_]*")
_LOCK = threading.Lock()  # one parse at a time in this process (see the module docstring)


@dataclass(frozen=True)
class Step:
    """One pipeline step: the modules its Prefect task calls, and the steps whose outputs it reads."""

    entry: tuple[str, ...]  # module names; "pkg.*" = every module of the package (looked up by name at run time)
    upstream: tuple[str, ...] = ()


# What each step's task calls, and the steps it reads from: estimate (the plan alone); download -> precompute ->
# train (every stage) -> sample, evaluate -> diffusers (its model card shows both) -> report.
_GRAPH = {
    "estimate": Step(("pipeline.planner.estimate",)),
    "download": Step(("pipeline.data.download", "pipeline.data.sources.*")),
    "precompute": Step(("pipeline.data.precompute",), upstream=("download",)),
    "train": Step(("pipeline.train.stage",), upstream=("precompute",)),
    "sample": Step(("pipeline.generate",), upstream=("train",)),
    "evaluate": Step(("pipeline.evaluate.evaluate",), upstream=("train",)),
    "diffusers": Step(("pipeline.export.diffusers_folder",), upstream=("sample", "evaluate")),
    "report": Step(("pipeline.report.report",), upstream=("sample", "evaluate", "diffusers")),
}
STEPS: dict[str, Step] = {name: _GRAPH[name] for name in PLAN_STEPS}  # the plan's steps, in its order


class _Tree:
    """Module names <-> source files under one root, and each file's imports of our packages."""

    def __init__(self, root: Path):
        self.root = root
        # (eager, lazy) imports per module, per tree: a fresh tree always rereads the sources
        self._imports: dict[str, tuple[set[str], set[str]]] = {}

    def path(self, module: str) -> Path | None:
        """The module's source file; None for a namespace package (a folder without __init__.py)."""
        base = self.root.joinpath(*module.split("."))
        for p in (base.with_suffix(".py"), base / "__init__.py"):
            if p.is_file():
                return p
        return None

    def exists(self, module: str) -> bool:
        return self.path(module) is not None or self.root.joinpath(*module.split(".")).is_dir()

    def package_modules(self, package: str) -> list[str]:
        """Every module under a package folder, the package itself included."""
        folder = self.root.joinpath(*package.split("."))
        if not folder.is_dir():
            raise ValueError(f"{package!r} is not a package under {self.root}")
        names = [package]
        for p in sorted(folder.rglob("*.py")):
            parts = p.relative_to(self.root).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
        return names

    def imports(self, module: str, lazy: bool = True) -> set[str]:
        """Our modules that `module` imports anywhere in its source (absolute, relative, submodule-by-name), and with
        `lazy` those its registries name ("module:attribute" strings, imported on first use)."""
        if module not in self._imports:
            self._imports[module] = self._parse(module)
        eager, named = self._imports[module]
        return eager | named if lazy else eager

    def _parse(self, module: str) -> tuple[set[str], set[str]]:
        path = self.path(module)
        if path is None:
            return set(), set()
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        found: set[str] = set()
        named: set[str] = set()
        for node in ast.walk(_parse(path)):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # `from ..core import x` in pipeline/data/precompute.py -> pipeline.core
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                found.add(base)
                # `from pipeline.core import storage`: storage is a module; `from x.configs import to_dict` is not.
                found.update(f"{base}.{a.name}" for a in node.names
                             if a.name != "*" and self.exists(f"{base}.{a.name}"))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and LAZY_SPEC.fullmatch(node.value):
                named.add(node.value.split(":")[0])  # a registry's "module:attribute", imported on first use
        ours = [{m for m in ms if m.split(".")[0] in PACKAGES and self.exists(m)} for ms in (found, named)]
        return ours[0], ours[1] - ours[0]


def _parse(path: Path) -> ast.Module:
    """The module's AST. Callers hold _LOCK; a thread outside our code parsing at the same moment can still trip
    the interpreter-wide depth check of CPython 3.11 (see the module docstring), which a second parse survives."""
    source = path.read_bytes()
    try:
        return ast.parse(source, filename=str(path))
    except SystemError:
        return ast.parse(source, filename=str(path))


def _with_parents(module: str) -> list[str]:
    """a.b.c -> [a, a.b, a.b.c]: importing a module runs every enclosing package's __init__.py first."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _closure(tree: _Tree, step: str) -> list[str]:
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; expected one of {list(STEPS)}")
    todo: list[str] = []
    for entry in STEPS[step].entry:
        if entry.endswith(".*"):
            todo += tree.package_modules(entry[:-2])
        elif tree.exists(entry):
            todo.append(entry)
        else:
            raise ValueError(f"entry point {entry!r} of step {step!r} not found under {tree.root}")
    seen: set[str] = set()
    while todo:
        for m in _with_parents(todo.pop()):
            if m not in seen:
                seen.add(m)
                todo += tree.imports(m)
    return sorted(seen)


def import_graph(root: str | Path | None = None, lazy: bool = True) -> dict[str, set[str]]:
    """module -> our modules it imports (anywhere in its source; with `lazy`, also those its registries name), for
    every module of our packages."""
    tree = _Tree(_root(root))
    modules = [m for pkg in PACKAGES for m in tree.package_modules(pkg)]
    with _LOCK:
        return {m: tree.imports(m, lazy) - {m} for m in modules}


def _root(root: str | Path | None) -> Path:
    return ROOT if root is None else Path(root).resolve()


def step_modules(step: str, root: str | Path | None = None) -> list[str]:
    """The sorted module names whose source decides `step`'s output (its own, not its upstream steps')."""
    with _LOCK:
        return _closure(_Tree(_root(root)), step)


def _package_version() -> str:
    try:
        return importlib.metadata.version("microdit")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


_MEMO: dict[tuple[Path, tuple], dict[str, str]] = {}  # (root, code state) -> every step's version


def _code_state(root: Path) -> tuple:
    """(file, size, mtime) of every source file of our packages: what the memoised versions depend on."""
    files = sorted(p for pkg in PACKAGES if (root / pkg).is_dir() for p in (root / pkg).rglob("*.py"))
    return tuple((str(p), st.st_size, st.st_mtime_ns) for p in files for st in [p.stat()])


def _compute(root: Path) -> dict[str, str]:
    tree, version, keys = _Tree(root), _package_version(), {}
    for step, spec in STEPS.items():  # in graph order: upstream keys exist before they are hashed in
        h = hashlib.sha256()
        for module in _closure(tree, step):
            path = tree.path(module)
            h.update(module.encode() + b"\0" + (path.read_bytes() if path else b"") + b"\0")
        for up in spec.upstream:
            h.update(f"upstream {up} {keys[up]}\0".encode())
        keys[step] = f"{version}+{h.hexdigest()[:12]}"
    return keys


def code_versions(root: str | Path | None = None) -> dict[str, str]:
    """Every step's code version for the sources under `root` (default: this checkout), computed once per code
    state: an edited file gives new versions, an unchanged tree the memoised ones."""
    root = _root(root)
    with _LOCK:
        key = (root, _code_state(root))
        if key not in _MEMO:
            _MEMO[key] = _compute(root)
        return dict(_MEMO[key])


def code_version(step: str, root: str | Path | None = None) -> str:
    """'<package version>+<12 hex>': hash of the step's module closure and of its upstream steps' versions."""
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; expected one of {list(STEPS)}")
    return code_versions(root)[step]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m flows.caching", description=__doc__.split("\n")[0])
    p.add_argument("--root", default=None, help=f"folder holding {', '.join(PACKAGES)} (default {ROOT})")
    p.add_argument("-v", "--verbose", action="store_true", help="list every module of each closure")
    args = p.parse_args(argv)
    keys = code_versions(args.root)
    for step, spec in STEPS.items():
        modules = step_modules(step, args.root)
        print(f"{step:<10} {keys[step]}  {len(modules):>3} modules  upstream: {', '.join(spec.upstream) or '-'}")
        if args.verbose:
            print("".join(f"    {m}\n" for m in modules), end="")


if __name__ == "__main__":
    main()
