"""Suite census: what each test file starts (Ray Train runs, Prefect flow runs, precomputes), for the suite's time.

Counted per test from the session's own services, so work done in subprocesses (the served deployments, the
CLI) is seen too: Ray Train runs from the session head's dashboard (`/api/train/v2/runs/v1`; the session turns
Train state tracking on), flow runs and precompute task runs (not cached) from the session's Prefect server, and
precomputes called outside a flow (`precompute`, `precompute_locally`) in this process. Clusters a test starts
for itself (tests/multinode.py, the GPU suite's own Ray) are not the session's and are not counted.

`pytest --census` prints the table at the end of the session; with xdist each worker prints its own files.
"""
from __future__ import annotations

import json
import urllib.request
from collections import defaultdict

import pytest

from ray_state import train_runs

# Set by conftest's fixtures when they start the services.
SERVICES: dict[str, str] = {}
_COUNTS: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
_LOCAL = {"precompute": 0}


def _post(url: str, body: dict):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=20) as r:
        return json.loads(r.read())


def _snapshot() -> dict[str, int]:
    out = {"precompute": _LOCAL["precompute"]}
    dash = SERVICES.get("dashboard")
    if dash:
        try:
            out["train_runs"] = len(train_runs(dash, SERVICES["token"]))
        except OSError:
            pass
    api = SERVICES.get("prefect")
    if api:
        try:
            out["flow_runs"] = _post(f"{api}/flow_runs/count", {})
            out["precompute"] += _post(f"{api}/task_runs/count", {"task_runs": {
                "name": {"like_": "precompute-"}, "state": {"name": {"any_": ["Completed", "Failed", "Running"]}}}})
        except OSError:
            pass
    return out


def _count_local_precomputes():
    """Wrap the precompute entry points of this process; calls inside a Prefect task are the server's count."""
    from pipeline.data import precompute as module

    def counted(fn):
        def wrapper(*args, **kwargs):
            from prefect.context import TaskRunContext

            if TaskRunContext.get() is None:
                _LOCAL["precompute"] += 1
            return fn(*args, **kwargs)

        wrapper.__wrapped__ = fn
        return wrapper

    for name in ("precompute", "precompute_locally"):
        setattr(module, name, counted(getattr(module, name)))


def pytest_addoption(parser):
    parser.addoption("--census", action="store_true", help="print Ray Train runs, flow runs and precomputes per file")


def pytest_configure(config):
    if config.getoption("--census"):
        _count_local_precomputes()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if not item.config.getoption("--census"):
        yield
        return
    before = _snapshot()
    yield
    after = _snapshot()
    counts = _COUNTS[item.path.name]
    for key, value in after.items():
        counts[key] += max(0, value - before.get(key, 0))


def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: hand the counts to the controller
        workeroutput["census"] = json.dumps(_COUNTS)


def pytest_testnodedown(node, error):
    for name, counts in json.loads(getattr(node, "workeroutput", {}).get("census", "{}")).items():
        for key, value in counts.items():
            _COUNTS[name][key] += value


def pytest_terminal_summary(terminalreporter, config):
    if not config.getoption("--census") or not _COUNTS:
        return
    tr = terminalreporter
    tr.section("census: started per file")
    tr.write_line(f"{'file':<32} {'train runs':>10} {'flow runs':>10} {'precomputes':>12}")
    for name in sorted(_COUNTS, key=lambda n: -sum(_COUNTS[n].values())):
        c = _COUNTS[name]
        if any(c.values()):
            tr.write_line(f"{name:<32} {c['train_runs']:>10} {c['flow_runs']:>10} {c['precompute']:>12}")
