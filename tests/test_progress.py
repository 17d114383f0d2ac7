"""The progress record and its throttled reporter (a fake clock: no timings), and the plain-line sink's cadence."""
from __future__ import annotations

import io

from flows.progress_sinks import LineSink
from pipeline.core.progress import Progress, Reporter, Throttle


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_throttle_sends_at_most_every_interval_and_always_the_end():
    clock, sent = Clock(), []
    r = Reporter("precompute-demo", "rows", Throttle(sent.append, every=30, clock=clock), total=100, clock=clock)
    for second in range(0, 95):  # one update a second
        clock.t = 1000.0 + second
        r.update(second, skipped=0)
    assert [p.done for p in sent] == [0, 30, 60, 90]  # first at once, then every 30 s
    r.finish(100, skipped=3)
    assert sent[-1].final and sent[-1].done == 100 and sent[-1].figures == {"skipped": 3}
    assert len(sent) == 5


def test_rate_and_eta_from_the_first_count():
    clock, sent = Clock(), []
    r = Reporter("train-stage1", "steps", sent.append, total=1000, clock=clock)
    r.update(200)  # resumed at step 200: the rate counts only what this run did
    clock.t += 10
    r.update(300, loss=0.5)
    p = sent[-1]
    assert p.rate == 10 and p.eta_s == 70 and p.fraction == 0.3
    assert p.line() == "train-stage1: 300/1000 steps (30%), 10 steps/s, loss 0.5, ETA 1:10"


def test_no_sink_reports_nothing_and_unknown_total_has_no_eta():
    r = Reporter("download-demo", "images", None)
    r.update(5)
    assert r.last.done == 5
    p = Progress("download-demo", 5, None, "images", rate=2.0)
    assert p.eta_s is None and p.fraction is None and p.line() == "download-demo: 5 images, 2 images/s"


def test_line_sink_prints_one_plain_line_per_record():
    out = io.StringIO()
    clock = Clock()
    r = Reporter("sample", "images", Throttle(LineSink(out), every=30, clock=clock), total=4, clock=clock)
    for i in range(4):
        clock.t += 20
        r.update(i)
    r.finish(4)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # t=20 (first), t=60 (>=30 s later), and the end; t=40 and t=80 are throttled
    assert all(line.startswith("[progress] sample: ") for line in lines)
    assert lines[-1].endswith("done") and "\x1b" not in out.getvalue()  # no escape codes off a TTY


def test_prefect_sink_outside_a_run_prints_a_plain_line(capsys):
    from flows.progress_sinks import PrefectSink

    PrefectSink()(Progress("download-demo", 3, 6, "images"))  # a task's .fn called directly: no run context
    assert capsys.readouterr().err == "[progress] download-demo: 3/6 images (50%)\n"


def test_training_progress_is_read_back_from_metrics_jsonl(tmp_path):
    from pipeline.train.metrics import MetricsLogger, follow_metrics

    sent = []
    stage = str(tmp_path / "stage1")
    with follow_metrics(stage, steps=4, sink=sent.append, step="train-stage1", poll=0.01):
        logger = MetricsLogger(stage, 0, tensorboard=False)  # what rank 0 writes while Ray Train runs
        for step in range(1, 5):
            logger.log({"step": step, "loss": 1.0 / step, "samples_per_s": 16.0, "step_s": 0.5,
                        "data_wait_s": 0.1, "mem_gb": 1.25})
    last = sent[-1]
    assert last.final and (last.done, last.total, last.unit) == (4, 4, "steps")
    assert last.figures == {"loss": 0.25, "samples/s": 16.0, "input wait": "20%", "mem GiB": 1.25}
    assert all(p.step == "train-stage1" for p in sent)


def test_live_lines_show_running_steps_with_their_figures():
    from cli.watch import LiveLines, StepView

    view = LiveLines()
    view.show([StepView("download-synthetic", "Cached"),  # no progress of its own: no line
               StepView("train-stage1", "Running", 15.0, "train-stage1: 120/800 steps (15%), loss 0.61")])
    (task,) = view.bars.tasks
    assert task.fields == {"name": "train-stage1", "figures": "120/800 steps (15%), loss 0.61"}
    assert task.completed == 15.0
