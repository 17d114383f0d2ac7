"""Where a step's progress records go while it runs as a Prefect task: the flow run page and the task's log.

`task_sink(every)` is what the tasks in flows/tasks.py hand their step: a `Throttle` (pipeline/core/progress.py)
in front of `PrefectSink`, which keeps one progress artifact per step (created on its first record, updated after),
logs each record as one plain `[progress] ...` line (the run's log: what `microdit run` prints off a TTY and what
CI keeps), and at the step's end adds a table artifact of its figures. Reporting never fails a step: an
unreachable API costs a warning. The report step's Markdown artifact is `report_artifacts` below.
"""
from __future__ import annotations

import base64
import logging
import sys
from typing import Any, TextIO

from pipeline.core import storage
from pipeline.core.progress import DEFAULT_EVERY, Progress, Sink, Throttle

PREFIX = "[progress] "  # what `microdit run` and `microdit status` look for in a run's logs
REPORT_KEY = "microdit-report"  # the report's Markdown artifact: keyed, so the UI's Artifacts page keeps its history
PLAN_KEY = "microdit-plan"  # the forecast made at the start of the run
MAX_INLINE_IMAGE = 2 * 2**20  # bytes: a bigger grid is linked by its path, not embedded in the artifact


class LineSink:
    """One plain line per record on `out` (stderr by default): readable in any log, no escape codes."""

    def __init__(self, out: TextIO | None = None):
        self.out = out

    def __call__(self, p: Progress) -> None:
        print(PREFIX + p.line(), file=self.out or sys.stderr, flush=True)


class PrefectSink:
    """Inside a task run: a progress artifact per step, a log line per record, a figures table at the end.
    Outside one (a task's `.fn` called directly, as tests and scripts do) it falls back to a plain line."""

    def __init__(self):
        self.ids: dict[str, Any] = {}  # step -> its progress artifact's id

    def __call__(self, p: Progress) -> None:
        from prefect import get_run_logger
        from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
        from prefect.context import FlowRunContext, TaskRunContext

        if TaskRunContext.get() is None and FlowRunContext.get() is None:
            LineSink()(p)
            return
        log = get_run_logger()
        log.info(PREFIX + p.line())
        percent = 100.0 * (p.fraction if p.fraction is not None else 0.0)
        try:
            if p.step in self.ids:
                update_progress_artifact(self.ids[p.step], percent, description=p.line())
            else:
                self.ids[p.step] = create_progress_artifact(percent, description=p.line())
            if p.final:
                create_table_artifact(figures_table(p), description=f"{p.step}: figures at its end")
        except Exception as e:  # the UI is a view of the run, never a reason to fail it
            log.warning("progress artifact for %s not written: %s", p.step, e)


def figures_table(p: Progress) -> list[dict[str, Any]]:
    """A step's final figures as rows {figure, value} (the Prefect UI shows them as a table)."""
    rows = [{"figure": f"{p.unit} done", "value": p.done}]
    if p.total is not None:
        rows.append({"figure": f"{p.unit} total", "value": p.total})
    if p.rate is not None:
        rows.append({"figure": f"{p.unit}/s", "value": round(p.rate, 4)})
    rows += [{"figure": k, "value": v} for k, v in p.figures.items()]
    return rows


def task_sink(every: float = DEFAULT_EVERY) -> Sink:
    """The sink a task hands its step: throttled to one record per step every `every` seconds, and the last."""
    return Throttle(PrefectSink(), every)


def report_artifacts(folder: str, report_uri: str) -> None:
    """The report (`report_uri`, its images in `folder`) as a Markdown artifact on the flow run, images inline,
    and its stage table as a table artifact."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    md = inline_images(storage.read_bytes(report_uri).decode(), folder)
    try:
        create_markdown_artifact(md, key=REPORT_KEY, description=f"run report ({report_uri})")
        stats_uri = storage.join(folder, "stats.json")
        if storage.exists(stats_uri):
            create_table_artifact(stage_table(storage.read_json(stats_uri)), description="stages of the run report")
    except Exception as e:  # as for progress: the artifact is a view; report.md is the record
        logging.getLogger(__name__).warning("report artifacts not written: %s", e)


def plan_artifact(md: str, uri: str) -> None:
    """The run's forecast (pipeline/planner/) as a Markdown artifact on the flow run."""
    from prefect.artifacts import create_markdown_artifact

    try:
        create_markdown_artifact(md, key=PLAN_KEY, description=f"forecast before the run ({uri})")
    except Exception as e:  # as for progress: the artifact is a view; estimate.json is the record
        logging.getLogger(__name__).warning("plan artifact not written: %s", e)


def inline_images(md: str, folder: str) -> str:
    """`![t](name.png)` -> `![t](data:image/png;base64,...)` (the Prefect UI renders data URIs; it cannot read
    the run's storage); an image over MAX_INLINE_IMAGE is replaced by a note with its path."""
    import re

    def inline(m: re.Match) -> str:
        title, name = m.group(1), m.group(2)
        if "://" in name or name.startswith("data:"):
            return m.group(0)
        uri = storage.join(folder, name)
        if not storage.exists(uri):
            return m.group(0)
        data = storage.read_bytes(uri)
        if len(data) > MAX_INLINE_IMAGE:
            return f"*{title}: {uri} ({len(data) / 2**20:.1f} MiB, not embedded)*"
        return f"![{title}](data:image/png;base64,{base64.b64encode(data).decode()})"

    return re.sub(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)", inline, md)


def stage_table(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per stage of the report's stats.json: the figures of its stage table."""
    keys = ("steps", "samples", "hours", "gpus", "gpu_hours", "core_hours", "cost_usd", "samples_per_s", "mfu",
            "input_wait", "first_loss", "final_loss")
    return [{"stage": name, **{k: _round(s.get(k)) for k in keys if k in s}}
            for name, s in stats.get("stages", {}).items()]


def _round(v: Any) -> Any:
    return round(v, 4) if isinstance(v, float) else v
