"""Progress and the report on the flow run page, read back through Prefect's client (the session's real server)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from flows.progress_sinks import PREFIX, report_artifacts, task_sink
from pipeline.core.progress import Reporter

pytestmark = pytest.mark.slow  # starts the session's Prefect server


def test_a_step_shows_progress_figures_and_the_report_on_its_flow_run(prefect_server, tmp_path):
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from cli.follow import follow
    from cli.watch import read_steps

    report = tmp_path / "report"
    report.mkdir()
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(report / "samples.png")
    (report / "report.md").write_text("# run\n\n![Final samples](samples.png)\n")
    (report / "stats.json").write_text('{"stages": {"stage1": {"steps": 4, "final_loss": 0.5}}}')

    @task(task_run_name="precompute-demo")
    def step():
        r = Reporter("precompute-demo", "samples", task_sink(every=0), total=4)
        for i in range(4):
            r.update(i, **{"skipped too_small": 0})
        r.finish(4, **{"skipped too_small": 1})

    @flow(name="progress-check")
    def run():
        step()
        report_artifacts(str(report), str(report / "report.md"))

    state = run(return_state=True)
    assert state.is_completed()
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)  # this flow ran in-process: its logs go to the API in batches
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        steps = read_steps(client, run_id)
        assert [(s.name, s.state, s.percent) for s in steps] == [("precompute-demo", "Completed", 100.0)]
        line = steps[0].line  # the final record's figures line
        assert line.startswith("precompute-demo: 4/4 samples (100%), ") and line.endswith("skipped too_small 1, done")
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[run_id])))
        by_type = {}
        for a in artifacts:
            by_type.setdefault(a.type, []).append(a)
        assert len(by_type["progress"]) == 1  # one per step, updated in place
        tables = [a.data for a in by_type["table"]]
        assert any('"skipped too_small"' in t and '"value": 1' in t for t in tables)  # the step's end figures
        assert any('"stage": "stage1"' in t for t in tables)  # the report's stage table
        (md,) = by_type["markdown"]
        assert md.key == "microdit-report" and "](data:image/png;base64," in md.data  # the grid travels inline

        out = []
        assert follow(client, run_id, poll=0.1, out=out.append, live=False) == "COMPLETED"
    lines = [line for line in out if PREFIX + "precompute-demo" in line]
    assert len(lines) == 5 and lines[-1].endswith("done")  # every=0: each of 4 updates and the end, in the log
