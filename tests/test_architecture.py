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
    graph = import_graph()
    assert len(graph) > 50
    assert _cycles(graph) == []
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
    allowed = {"pipeline", "model", "model.objectives", "model.objectives.configs"}
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
