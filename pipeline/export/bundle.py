"""One self-contained source file from a module of ours and the modules of ours it imports.

An exported diffusers folder carries its pipeline's, network's and scheduler's code (diffusers loads it with
`trust_remote_code=True`), and must load where microdit is not installed. `bundle("model.pipelines.microdit")` walks
the module's `from model... import` statements, puts every module it reaches (dependencies first) into one file with
those imports removed, and refuses what would change meaning once flattened: a name defined by two modules, an
aliased or in-function import of ours, or a star import. The code itself is copied, not rewritten.
"""
from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass

OWN_PACKAGES = ("model",)


@dataclass
class _Module:
    name: str
    source: str
    tree: ast.Module


def _read(name: str) -> _Module:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise ValueError(f"cannot bundle {name!r}: no Python source found")
    with open(spec.origin, encoding="utf-8") as f:
        source = f.read()
    return _Module(name, source, ast.parse(source, spec.origin))


def _is_own(module: str | None) -> bool:
    return module is not None and module.split(".")[0] in OWN_PACKAGES


def _own_imports(mod: _Module) -> list[ast.ImportFrom]:
    """The module's top-level `from model... import name` statements; ValueError for any it cannot flatten."""
    found = []
    for node in ast.walk(mod.tree):
        if isinstance(node, ast.Import) and any(_is_own(a.name) for a in node.names):
            raise ValueError(f"{mod.name}: `import {node.names[0].name}` of our own package cannot be bundled; "
                             "use `from ... import name`")
        if not isinstance(node, ast.ImportFrom) or not (_is_own(node.module) or node.level):
            continue
        where = f"{mod.name} line {node.lineno}"
        if node.level:
            raise ValueError(f"{where}: relative import cannot be bundled")
        if node not in mod.tree.body:
            raise ValueError(f"{where}: an import of our own package inside a function cannot be bundled")
        for alias in node.names:
            if alias.name == "*" or alias.asname:
                raise ValueError(f"{where}: `{alias.name}{' as ' + alias.asname if alias.asname else ''}` "
                                 "cannot be bundled (star or aliased import)")
        found.append(node)
    return found


def _defined_names(tree: ast.Module) -> set[str]:
    """Top-level names a module defines itself (functions, classes, assignments)."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


def _order(root: str) -> list[_Module]:
    """`root` and every module of ours it imports, each after the modules it imports."""
    ordered, seen, visiting = [], set(), set()

    def visit(name: str) -> None:
        if name in seen:
            return
        if name in visiting:
            raise ValueError(f"cannot bundle {root!r}: import cycle through {name!r}")
        visiting.add(name)
        mod = _read(name)
        for node in _own_imports(mod):
            if _is_package(node.module):
                raise ValueError(f"{name}: imports from the package {node.module!r} itself; import from its module")
            visit(node.module)
        visiting.discard(name)
        seen.add(name)
        ordered.append(mod)

    visit(root)
    return ordered


def _is_package(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    return spec is not None and spec.submodule_search_locations is not None


def _without(mod: _Module, nodes: list[ast.stmt]) -> str:
    """The module's source minus the lines of `nodes` and of `from __future__ import ...`."""
    drop = set()
    for node in mod.tree.body:
        if node in nodes or (isinstance(node, ast.ImportFrom) and node.module == "__future__"):
            drop.update(range(node.lineno, node.end_lineno + 1))
    lines = mod.source.splitlines()
    return "\n".join(line for i, line in enumerate(lines, 1) if i not in drop).strip("\n")


def bundle(root: str, title: str) -> str:
    """One file of `root` and the modules of ours it imports (see the module docstring); `title` heads it."""
    modules = _order(root)
    owner: dict[str, str] = {}
    for mod in modules:
        for name in _defined_names(mod.tree):
            if name in owner and not name.startswith("__"):
                raise ValueError(f"cannot bundle {root!r}: {name!r} is defined by both {owner[name]} and {mod.name}")
            owner[name] = mod.name
    parts = [f'"""{title}\n\nGenerated by microdit from {", ".join(m.name for m in modules)}: one file, so this folder '
             'loads without microdit installed."""',
             "from __future__ import annotations"]
    for mod in modules:
        parts.append(f"# {'-' * 40} {mod.name}\n" + _without(mod, _own_imports(mod)))
    return "\n\n\n".join(parts) + "\n"
