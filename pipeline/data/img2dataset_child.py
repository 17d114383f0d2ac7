"""The download step's child process: img2dataset 1.47's `download()` with some of its module globals swapped.

    python -m pipeline.data.img2dataset_child KWARGS_JSON HOOKS_JSON

Its logger process only prints speed stats (the step logs progress from the stats files), and with one process its
spawn pool only adds another interpreter start and import. Its resizer is replaced by our decoder and size policy,
and its fetch by one with a total deadline (pipeline/data/img2dataset_hooks.py says why); the Reader and writers
are img2dataset's own. A child of its own because img2dataset installs signal handlers (main thread only) and spawns
its own pool.
"""
from __future__ import annotations

import ctypes
import json
import signal
import sys
from functools import partial


class NoLogger:
    """img2dataset's LoggerProcess interface, doing nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def start(self):
        pass

    def join(self, timeout=None):
        pass

    def terminate(self):
        pass


def serial(processes_count, downloader, reader, subjob_size, max_shard_retry):
    """img2dataset's multiprocessing_distributor for one process: the shards in this process, then its retries."""
    from img2dataset.distributor import retrier

    def run(shards):
        return [row for ok, row in map(downloader, shards) if not ok]

    retrier(run, run(reader), max_shard_retry)


def main(argv: list[str]) -> None:
    try:  # die with the parent (PR_SET_PDEATHSIG), so a killed step leaves no download running
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)
    except OSError:
        pass
    import img2dataset  # noqa: F401  (registers img2dataset.main)

    from pipeline.data.img2dataset_hooks import DeadlineDownloader, PolicyResizer
    from pipeline.data.sources.shards import IngestConfig

    m = sys.modules["img2dataset.main"]  # the package's `main` attribute is the CLI function, not the module
    kwargs, hooks = json.loads(argv[0]), json.loads(argv[1])
    policy = IngestConfig(**hooks["policy"])
    m.Resizer = lambda **_: PolicyResizer(policy)  # img2dataset's own size arguments are replaced by `policy`
    m.Downloader = partial(DeadlineDownloader, total_timeout=hooks["total_timeout"])
    m.LoggerProcess = NoLogger
    if kwargs["processes_count"] == 1:
        m.multiprocessing_distributor = serial
    m.download(**kwargs)


if __name__ == "__main__":
    main(sys.argv[1:])
