"""Trigger a deployment through the Prefect API and follow its flow run to a final state, printing as it goes.

On a terminal each step with progress gets a live line (cli/watch.py); elsewhere the run's logs, with their
plain `[progress]` lines, are printed as they come.
"""
from __future__ import annotations

import time
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, LogFilter, LogFilterFlowRunId
from prefect.client.schemas.sorting import FlowRunSort, LogSort
from prefect.exceptions import ObjectNotFound

from cli.watch import LiveLines, live_wanted, read_steps


def run_and_follow(deployment: str, parameters: dict, poll: float = 2.0, out=print, live: bool | None = None) -> str:
    """Create a flow run of `deployment`, print its state changes, task states and logs; return the final state type."""
    with get_client(sync_client=True) as client:
        try:
            dep = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            raise ValueError(f"deployment {deployment!r} does not exist on {client.api_url}; is the deployment "
                             "server (`microdit up`) running?") from None
        run = client.create_flow_run_from_deployment(dep.id, parameters=parameters)
        out(f"flow run {run.name} ({run.id}) of {deployment}")
        return follow(client, run.id, poll, out, live)


def follow(client, flow_run_id: UUID, poll: float = 2.0, out=print, live: bool | None = None) -> str:
    """Print new logs and state changes of one flow run until it is final; return the final state type.

    live: one redrawn line per running step (default: when printing to a terminal)."""
    if live is None:
        live = out is print and live_wanted()
    if not live:
        return _follow(client, flow_run_id, poll, out, None)
    with LiveLines() as view:
        return _follow(client, flow_run_id, poll, view.print, view)


def _follow(client, flow_run_id: UUID, poll: float, out, view) -> str:
    seen_logs, last_state, task_states = 0, None, {}
    while True:
        run = client.read_flow_run(flow_run_id)
        state = run.state
        if state and (state.type, state.name) != last_state:
            last_state = (state.type, state.name)
            out(f"[flow] {state.name}")
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                sort=LogSort.TIMESTAMP_ASC, offset=seen_logs, limit=200)
        for log in logs:
            out(f"  {log.timestamp:%H:%M:%S} {log.message}")
        seen_logs += len(logs)
        for tr in client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]})):
            name = tr.state.name if tr.state else "?"
            if task_states.get(tr.id) != name:
                task_states[tr.id] = name
                out(f"[task] {tr.name}: {name}")
        if view is not None:
            view.show(read_steps(client, flow_run_id))
        if state and state.is_final() and len(logs) < 200:
            return state.type.value
        time.sleep(poll)


def recent_runs(limit: int = 5) -> list[str]:
    """One line per recent flow run of the `microdit` flow: name, deployment, state, start time."""
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["microdit"])),
                                     sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=limit)
        deps = {}
        lines = ["last flow runs:" if runs else "no flow runs yet"]
        for r in runs:
            if r.deployment_id and r.deployment_id not in deps:
                deps[r.deployment_id] = client.read_deployment(r.deployment_id).name
            lines.append(f"  {r.name:<24} {deps.get(r.deployment_id, '-'):<10} "
                         f"{r.state.name if r.state else '?':<10} {r.start_time or ''}")
        return lines
