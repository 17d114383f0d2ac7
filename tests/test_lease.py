"""One run per storage root (Reliability item 7): a live run's lease keeps a second run out, with a message
naming the holder; a killed run's lease is taken over; local folders and S3 alike."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from pipeline.core import lease, storage


def test_second_run_is_refused_while_the_first_heartbeats(tmp_path):
    root = str(tmp_path)
    with lease.hold(root, "flow run first", ttl=0.9, settle=0.05) as held:
        time.sleep(1.2)  # longer than the ttl: only the heartbeat keeps the lease fresh
        with pytest.raises(lease.RootBusy, match=r"in use by 'flow run first'.*pid \d+"):
            with lease.hold(root, "flow run second", ttl=0.9, wait=0.5, settle=0.05):
                pass
        assert json.loads((tmp_path / lease.LEASE).read_text())["token"] == held["token"]
    assert not (tmp_path / lease.LEASE).exists()  # released at the end
    with lease.hold(root, "flow run second", ttl=0.9, settle=0.05):  # and free for the next run
        pass


def test_lease_of_a_killed_run_is_taken_over(tmp_path):
    """A run killed with SIGKILL leaves its lease; its process is gone, so the next run takes the root at once."""
    code = ("import sys, time; from pipeline.core import lease\n"
            "with lease.hold(sys.argv[1], 'doomed', ttl=600, settle=0.05):\n"
            "    print('held', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        proc.kill()
        proc.wait(timeout=30)
        assert json.loads((tmp_path / lease.LEASE).read_text())["owner"] == "doomed"
        t0 = time.monotonic()
        with lease.hold(str(tmp_path), "next", ttl=600, wait=5, settle=0.05):
            assert time.monotonic() - t0 < 3
    finally:
        proc.kill()


def test_stale_heartbeat_expires():
    old = {"owner": "x", "host": "elsewhere", "pid": 1, "heartbeat": time.time() - 100}
    assert lease.is_stale(old, ttl=30) and not lease.is_stale({**old, "heartbeat": time.time()}, ttl=30)


def test_lease_on_s3(s3_endpoint, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    root = f"s3://{s3_bucket}/lease-run"
    with lease.hold(root, "a", ttl=30, settle=0.05):  # a long ttl: a loaded machine never makes "a" stale
        assert storage.exists(f"{root}/{lease.LEASE}")
        with pytest.raises(lease.RootBusy, match="'a'"):
            with lease.hold(root, "b", ttl=30, wait=0.2, settle=0.05):
                pass
    assert not storage.exists(f"{root}/{lease.LEASE}")


def test_a_storage_error_is_not_read_as_no_lease(tmp_path):
    """Only a missing lease means a free root: a failed read (here a directory where the lease should be) is
    retried, then raised, never taken as "no lease" (which would let a second run in beside a live one)."""
    (tmp_path / lease.LEASE).mkdir()
    with pytest.raises(OSError) as err:
        lease._read(str(tmp_path / lease.LEASE), tries=2)
    assert not isinstance(err.value, FileNotFoundError)
