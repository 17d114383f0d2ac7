"""Progress of a long step: one small record the plain steps emit through a sink they are given.

A step makes a `Reporter` from the sink it was handed (None: nothing is reported), calls `update` at its own
cadence and `finish` once at its end; the reporter adds rate and ETA. The sink is built in flows/ (Prefect
artifacts, a log line, a terminal bar) behind a `Throttle`, which forwards a step's records at most every N
seconds (default 30, the plan's `progress_every`) and always its last. The steps never import Prefect.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

DEFAULT_EVERY = 30.0  # seconds between records of one step (the plan's `progress_every` overrides it)


@dataclass(frozen=True)
class Progress:
    """Where one step stands: `done` of `total` units (None: unknown), rate in units/s, figures of the step."""

    step: str
    done: float
    total: float | None
    unit: str
    rate: float | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    final: bool = False

    @property
    def fraction(self) -> float | None:
        if not self.total:
            return 1.0 if self.final else None
        return min(max(self.done / self.total, 0.0), 1.0)

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the current rate; None when the total or a positive rate is unknown."""
        if self.final:
            return 0.0
        if not self.total or not self.rate or self.rate <= 0:
            return None
        return max(self.total - self.done, 0.0) / self.rate

    def line(self) -> str:
        """One plain line: `step: done/total unit (pct) rate unit/s, figures, ETA` (what logs and `status` show)."""
        count = f"{_num(self.done)}/{_num(self.total)}" if self.total else _num(self.done)
        parts = [f"{count} {self.unit}"]
        if self.fraction is not None:
            parts[0] += f" ({self.fraction:.0%})"
        if self.rate is not None:
            parts.append(f"{_num(self.rate)} {self.unit}/s")
        parts += [f"{k} {_num(v)}" for k, v in self.figures.items()]
        if self.final:
            parts.append("done")
        elif self.eta_s is not None:
            parts.append(f"ETA {format_seconds(self.eta_s)}")
        return f"{self.step}: " + ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "done": self.done, "total": self.total, "unit": self.unit, "rate": self.rate,
                "figures": dict(self.figures), "final": self.final, "eta_s": self.eta_s}


Sink = Callable[[Progress], None]


class Reporter:
    """A step's handle on its sink: turns counts into records with rate and ETA (the sink decides how often
    they go further: see `Throttle`)."""

    def __init__(self, step: str, unit: str, sink: Sink | None, total: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.step, self.unit, self.sink, self.total, self.clock = step, unit, sink, total, clock
        self.start = clock()
        self.start_done: float | None = None  # units already done when counting began (a resumed step)
        self.last: Progress | None = None

    def record(self, done: float, total: float | None = None, final: bool = False, rate: float | None = None,
               **figures) -> Progress:
        """The record for `done` now (rate: given, else the average since this reporter's first count)."""
        if total is not None:
            self.total = total
        now = self.clock()
        if self.start_done is None:
            self.start_done, self.start = done, now
        if rate is None and now > self.start:
            rate = (done - self.start_done) / (now - self.start)
        self.last = Progress(self.step, done, self.total, self.unit, rate, figures, final)
        return self.last

    def update(self, done: float, total: float | None = None, rate: float | None = None, **figures) -> None:
        """Report `done` units so far, with the step's figures now."""
        p = self.record(done, total, rate=rate, **figures)
        if self.sink is not None:
            self.sink(p)

    def finish(self, done: float | None = None, total: float | None = None, rate: float | None = None,
               **figures) -> Progress:
        """The final record: `done` (default: the last count, else the total) with the step's figures (rate:
        given, else the average since the first count)."""
        if done is None:
            done = self.last.done if self.last else (total or self.total or 0)
        figures = {**(self.last.figures if self.last else {}), **figures}
        p = self.record(done, total, final=True, rate=rate, **figures)
        if self.sink is not None:
            self.sink(p)
        return p


class Throttle:
    """A sink that forwards each step's records at most every `every` seconds (its first at once), and always its
    final one, so the sink behind it may be slow (an HTTP call) and logs stay short."""

    def __init__(self, sink: Sink, every: float = DEFAULT_EVERY, clock: Callable[[], float] = time.monotonic):
        if every < 0:
            raise ValueError(f"progress interval must be >= 0 seconds, got {every}")
        self.sink, self.every, self.clock = sink, every, clock
        self.sent: dict[str, float] = {}  # step -> when its last record went out

    def __call__(self, p: Progress) -> None:
        now = self.clock()
        last = self.sent.get(p.step)
        if p.final or last is None or now - last >= self.every:
            self.sent[p.step] = now
            self.sink(p)


def fan_out(*sinks: Sink | None) -> Sink | None:
    """One sink that hands each record to every given sink (None ones left out; None when none is left)."""
    live = [s for s in sinks if s is not None]
    if not live:
        return None
    if len(live) == 1:
        return live[0]

    def sink(p: Progress) -> None:
        for s in live:
            s(p)

    return sink


def format_seconds(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


def _num(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
