"""Cache keys from the code itself: each step's import closure, and the keys of the steps upstream of it."""
from __future__ import annotations

import re
import shutil
import textwrap
import threading
import time
from pathlib import Path

import pytest

from flows import caching
from flows.caching import PACKAGES, ROOT, STEPS, code_version, code_versions, step_modules

EVALUATE_ONLY = ("pipeline.evaluate", "pipeline.evaluate.evaluate", "pipeline.evaluate.metrics")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of our three packages: edits there leave the checkout alone."""
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return tmp_path


def append_comment(root: Path, module: str) -> None:
    path = root.joinpath(*module.split(".")).with_suffix(".py")
    path.write_text(path.read_text() + "\n# an edit that changes no behaviour, but the source\n")


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {step for step in before if before[step] != after[step]}


def test_closures_hold_the_modules_the_hand_kept_list_missed():
    precompute = step_modules("precompute")
    assert {"pipeline.data.precompute_stages", "model.encoders"} <= set(precompute)  # encoders: a lazy import
    evaluate = step_modules("evaluate")
    assert {"pipeline.evaluate.metrics", "pipeline.data.coco_captions"} <= set(evaluate)
    assert {"pipeline", "pipeline.evaluate"} <= set(evaluate)  # package __init__.py files run on import
    download = step_modules("download")
    assert {"pipeline.data.sources.cc12m", "pipeline.data.sources.synthetic"} <= set(download)  # whole package


def test_evaluation_modules_stay_out_of_the_steps_before_it():
    for step in ("download", "precompute", "train", "sample"):
        assert not set(EVALUATE_ONLY) & set(step_modules(step)), step


def test_closures_follow_no_outside_package():
    for step in STEPS:
        modules = step_modules(step)
        assert modules == sorted(set(modules))
        assert {m.split(".")[0] for m in modules} <= set(PACKAGES), step


def test_code_version_format_memo_and_errors():
    versions = code_versions()
    assert set(versions) == set(STEPS)
    for step, v in versions.items():
        assert re.fullmatch(r"[^+]+\+[0-9a-f]{12}", v), v
        assert code_version(step) is code_version(step)  # memoised
    assert len(set(versions.values())) == len(versions)
    with pytest.raises(ValueError, match="unknown step 'stage1'"):
        code_version("stage1")
    with pytest.raises(ValueError, match="unknown step"):
        step_modules("fid")


def test_editing_metrics_invalidates_evaluate_and_report_only(tree: Path):
    before = code_versions(tree)
    assert before == code_versions(tree)  # deterministic
    append_comment(tree, "pipeline.evaluate.metrics")
    assert changed(before, code_versions(tree)) == {"evaluate", "diffusers", "report"}


def test_editing_a_precompute_stage_invalidates_precompute_and_everything_after(tree: Path):
    before = code_versions(tree)
    append_comment(tree, "pipeline.data.precompute_stages")
    assert changed(before, code_versions(tree)) == {"precompute", "train", "sample", "evaluate", "diffusers", "report"}


def test_editing_a_source_adapter_invalidates_everything(tree: Path):
    before = code_versions(tree)
    append_comment(tree, "pipeline.data.sources.journeydb")  # looked up by name: no module imports it alone
    assert changed(before, code_versions(tree)) == set(STEPS) - {"estimate"}  # the forecast reads the plan alone


def test_editing_the_report_invalidates_the_report_only(tree: Path):
    before = code_versions(tree)
    append_comment(tree, "pipeline.report.report")
    assert changed(before, code_versions(tree)) == {"report"}


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_every_import_form_is_followed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    write(tmp_path, {
        "pipeline/__init__.py": "",
        "pipeline/core/__init__.py": "",
        "pipeline/core/storage.py": "import os\n",
        "pipeline/core/configs.py": "def to_dict(x): return x\n",
        "pipeline/core/unused.py": "",
        "pipeline/core/ns/leaf.py": "",  # a namespace package: a folder without __init__.py
        "pipeline/step/__init__.py": "from .helpers import helper\n",
        "pipeline/step/helpers.py": "from ..core import storage\nfrom pipeline.core.configs import to_dict\n",
        "pipeline/step/main.py": """\
            import numpy as np
            from . import sibling

            def run():
                import model.net as net  # lazy, in a function
                from pipeline.core.ns import leaf
                return net, leaf
            """,
        "pipeline/step/sibling.py": "",
        "model/__init__.py": "",
        "model/net.py": "from model import blocks\n",
        "model/blocks.py": "",
    })
    monkeypatch.setitem(STEPS, "toy", caching.Step(("pipeline.step.main",)))
    assert step_modules("toy", tmp_path) == [
        "model", "model.blocks", "model.net", "pipeline", "pipeline.core", "pipeline.core.configs",
        "pipeline.core.ns", "pipeline.core.ns.leaf", "pipeline.core.storage", "pipeline.step",
        "pipeline.step.helpers", "pipeline.step.main", "pipeline.step.sibling"]


def test_main_prints_every_step(capsys: pytest.CaptureFixture[str]):
    caching.main(["-v"])
    out = capsys.readouterr().out
    for step in STEPS:
        assert re.search(rf"^{step} +\S+\+[0-9a-f]{{12}} +\d+ modules", out, re.M), step
    assert "    pipeline.evaluate.metrics\n" in out


def test_runs_asking_at_once_parse_one_at_a_time(tree: Path, monkeypatch):
    """Two flow runs in one serve process ask for their keys at the same moment: CPython 3.11's AST constructor
    keeps interpreter-wide state (python/cpython#106905), so parses never overlap, the tree is parsed once for
    its code state, and every caller gets the same versions."""
    inside, most, calls, guard = 0, 0, 0, threading.Lock()
    real = caching._parse  # ours only: threads of other libraries in this worker parse too

    def parse(*args, **kwargs):
        nonlocal inside, most, calls
        with guard:
            inside, calls = inside + 1, calls + 1
            most = max(most, inside)
        time.sleep(0.002)  # widen the window two overlapping parses would need
        try:
            return real(*args, **kwargs)
        finally:
            with guard:
                inside -= 1

    monkeypatch.setattr(caching, "_parse", parse)
    results: list[dict] = []
    threads = [threading.Thread(target=lambda: results.append(code_versions(tree))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most == 1 and len(results) == 4 and all(r == results[0] for r in results)
    once = calls
    assert code_versions(tree) == results[0] and calls == once  # memoised for this code state
    append_comment(tree, "pipeline.evaluate.metrics")
    assert changed(results[0], code_versions(tree)) == {"evaluate", "diffusers", "report"} and calls > once


def test_modules_a_registry_names_by_string_are_in_the_closure():
    """Registries import on first use ("module:attribute", model/family.py, model/encoders): still the step's code."""
    precompute = set(step_modules("precompute"))
    assert {"model.encoders.clip_text", "model.encoders.llama", "model.encoders.standin"} <= precompute
    train = set(step_modules("train"))
    assert {"model.microdit.family", "model.emmdit.network", "model.pipelines.emmdit"} <= train
