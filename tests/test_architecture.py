"""The layout's promises, checked on the source: no import cycles, model/ independent of the pipeline, every
folder says what lives in it, test-only machinery outside the product's config."""
from __future__ import annotations

import ast

from flows.caching import PACKAGES, ROOT, import_graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in graph:
                    continue
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_import_graph_has_no_cycles():
    """Import-time cycles only: a registry naming a module ("model.microdit.family:FAMILY") that imports the registry
    back is the registry's point, and is imported on first use."""
    graph = import_graph(lazy=False)
    assert len(graph) > 50
    assert _cycles(graph) == []
    assert _cycles(import_graph())  # the registries' edges are seen where caching needs them
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check checks


def test_model_imports_nothing_from_pipeline_or_flows():
    bad = {m: sorted(i for i in deps if not i.startswith("model"))
           for m, deps in import_graph().items() if m.startswith("model")}
    assert {m: d for m, d in bad.items() if d} == {}


def test_plan_imports_no_step():
    """The plan is the shared core: a step's cache key must not change when another step's code does. Of model/ it
    reads the objectives' configs only (the one home of their constants), never an algorithm."""
    graph = import_graph()
    plan = [m for m in graph if m.startswith("pipeline.core")]
    allowed = {"pipeline", "model", "model.family", "model.objectives", "model.objectives.configs"}
    outside = {m: sorted(d for d in graph[m] if not d.startswith("pipeline.core") and d not in allowed)
               for m in plan}
    assert {m: d for m, d in outside.items() if d} == {}
    assert graph["model.objectives"] == set() and graph["model.objectives.configs"] == set()


def test_every_package_says_what_lives_in_it():
    for pkg in PACKAGES:
        for init in (ROOT / pkg).rglob("__init__.py"):
            doc = ast.get_docstring(ast.parse(init.read_text()))
            assert doc and len(doc) > 30, f"{init} has no docstring saying what lives there"


def test_fault_injection_is_not_a_plan_setting():
    from pipeline.core.plan import StageConfig

    fields = set(StageConfig.model_fields)
    assert not fields & {"debug", "crash_rank", "nan_loss_steps"}
    users = [m for m, deps in import_graph().items() if "pipeline.testing.faults" in deps]
    assert users == []  # reached only through MICRODIT_TRAIN_HOOKS (pipeline/train/hooks.py)


def test_product_code_imports_no_test_machinery():
    """pipeline/testing/ (fault injection) is reached through the train hooks' spec string only; the demo's data
    is product (pipeline/data/shapes.py)."""
    graph = import_graph()
    users = {m: sorted(d for d in deps if d.startswith("pipeline.testing"))
             for m, deps in graph.items() if not m.startswith("pipeline.testing")}
    assert {m: d for m, d in users.items() if d} == {}
    assert {"pipeline.testing.faults"} <= set(graph)  # the check sees the package


def test_model_is_a_package_per_family_plus_shared_ones():
    from model.family import REGISTRY

    root = ROOT / "model"
    packages = {p.name for p in root.iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(REGISTRY) | {"objectives", "samplers", "encoders", "pipelines"}
    assert {p.stem for p in root.glob("*.py")} == {"__init__", "family", "ema", "positions"}


def test_no_module_under_flows_starts_processes():
    """flows/ holds the Prefect flows and their tasks; starting and supervising processes is cli/'s (cli/stack.py)."""
    spawning = {"subprocess", "multiprocessing", "os.fork", "os.spawnv", "os.execv", "os.system", "os.popen"}
    found = {}
    for path in sorted((ROOT / "flows").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                names = [f"{node.value.id}.{node.attr}"]
            hits = [n for n in names if n in spawning or n.split(".")[0] in {"subprocess", "multiprocessing"}]
            if hits:
                found.setdefault(path.name, set()).update(hits)
    assert found == {}
    assert (ROOT / "cli" / "stack.py").read_text().count("subprocess.Popen") >= 1  # the check looks where they are


def test_every_reader_of_a_shared_run_is_scheduled_with_it():
    """A test file that reads a shared run (tests/shared_runs.py) is listed in conftest's SHARED_RUNS under that
    run, so it runs on the worker that made the run instead of making it again."""
    from conftest import SHARED_RUNS

    tests = ROOT / "tests"
    fixtures = {"tiny_flow", "emmdit_flow"}
    readers = {}
    for path in sorted(tests.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                for arg in node.args.args:
                    if arg.arg in fixtures:
                        readers[path.name] = arg.arg
    assert readers and readers == SHARED_RUNS
