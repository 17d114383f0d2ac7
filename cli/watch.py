"""The CLI's view of a running flow: its steps' progress, read back from Prefect (the artifacts the tasks keep).

`microdit run|demo|stage` follow a run through cli/follow.py: on a terminal each running step gets one live
line (rich) with its latest figures; off a terminal nothing is redrawn and the run's plain `[progress]` log lines
(flows/progress_sinks.py) are the record. `microdit status` prints each step's state and latest figures.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType, FlowFilter,
                                            FlowFilterName, FlowRunFilter)
from prefect.client.schemas.sorting import FlowRunSort
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

from flows.progress_sinks import PREFIX


@dataclass
class StepView:
    """One task run as the CLI shows it: name, state, percent done and its latest progress line."""

    name: str
    state: str
    percent: float | None = None
    line: str | None = None


def read_steps(client, flow_run_id: UUID) -> list[StepView]:
    """Every task run of the flow run, in start order, with its progress artifact's latest figures (if any)."""
    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}))
    artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), type=ArtifactFilterType(any_=["progress"])))
    latest = {}
    for a in sorted(artifacts, key=lambda a: a.updated or a.created):
        latest[a.task_run_id] = a  # a retried task updates, or adds, its own
    steps = []
    for tr in sorted(runs, key=lambda r: (r.start_time or r.expected_start_time or r.created)):
        a = latest.get(tr.id)
        steps.append(StepView(tr.name, tr.state.name if tr.state else "?",
                              float(a.data) if a is not None and a.data is not None else None,
                              a.description if a is not None else None))
    return steps


def status_lines(limit_runs: int = 1) -> list[str]:
    """The latest flow run of the `microdit` flow: its state, then each step's state and latest figures."""
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["microdit"])),
                                     sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=limit_runs)
        lines = []
        for run in runs:
            lines.append(f"flow run {run.name} ({run.id}): {run.state.name if run.state else '?'}")
            for s in read_steps(client, run.id):
                figures = s.line.split(": ", 1)[1] if s.line and ": " in s.line else (s.line or "")
                lines.append(f"  {s.name:<22} {s.state:<10} {figures}".rstrip())
        return lines


class LiveLines:
    """One rich progress line per step while a run is followed on a terminal; logs print above them."""

    def __init__(self):
        self.console = Console()
        self.bars = Progress(TextColumn("{task.fields[name]:<20}"), BarColumn(bar_width=24),
                             TextColumn("{task.percentage:>5.1f}%"), TextColumn("{task.fields[figures]}"),
                             console=self.console, transient=False)
        self.ids: dict[str, int] = {}

    def __enter__(self) -> "LiveLines":
        self.bars.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bars.stop()

    def print(self, text: str) -> None:
        if text.lstrip().split(" ", 1)[-1].startswith(PREFIX):  # the live line shows it already
            return
        self.console.print(text, markup=False, highlight=False)

    def show(self, steps: list[StepView]) -> None:
        for s in steps:
            if s.percent is None and s.state not in ("Running",):
                continue  # a cached or quick step without progress: its state line is enough
            figures = s.line.split(": ", 1)[1] if s.line and ": " in s.line else s.state
            if s.name not in self.ids:
                self.ids[s.name] = self.bars.add_task("", total=100, name=s.name, figures=figures)
            self.bars.update(self.ids[s.name], completed=s.percent or 0.0,
                             figures=figures if s.state == "Running" else f"{s.state}: {figures}")


def live_wanted() -> bool:
    """Live lines only on a terminal: CI logs and pipes get plain lines."""
    return sys.stdout.isatty()
