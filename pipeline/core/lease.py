"""One run per storage root: a lease file with an owner and a heartbeat, under the root itself.

A run holds `{root}/_lease.json` ({owner, host, pid, heartbeat}) while it works and refreshes it every
`ttl / 3` seconds from a background thread. A second run on the same root waits while the holder is alive and
refuses with a message naming it after `wait` seconds; a holder that stopped heartbeating for `ttl` seconds, or
whose process is gone from this host, is stale and its lease is taken over. This works on any storage the
pipeline writes (local or s3://); object stores have no atomic create-if-absent, so a taker writes its lease,
waits a moment and reads it back: of two racing takers, the one whose write landed last keeps it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid

from pipeline.core import storage

LEASE = "_lease.json"


class RootBusy(RuntimeError):
    """Another live run holds the storage root."""


def _read(uri: str, tries: int = 4) -> dict | None:
    """The lease at `uri`, None when there is none (or it is unreadable JSON). A storage error is retried, then
    raised: reading "no lease" from a failed request would let a second run take a live run's root."""
    for attempt in range(tries):
        try:
            return json.loads(storage.read_bytes(uri))
        except (FileNotFoundError, ValueError):
            return None
        except OSError:
            if attempt == tries - 1:
                raise
            time.sleep(0.5 * 2**attempt)
    return None


def _alive_here(lease: dict) -> bool:
    """False when the holder ran on this host and its process is gone (a killed run)."""
    if lease.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(lease["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


def is_stale(lease: dict, ttl: float, now: float | None = None) -> bool:
    now = time.time() if now is None else now
    return now - float(lease.get("heartbeat", 0)) > ttl or not _alive_here(lease)


@contextlib.contextmanager
def hold(root: str, owner: str, ttl: float = 30.0, wait: float = 60.0, settle: float = 0.5):
    """Hold the root's lease for the block; RootBusy (naming the holder) if a live run keeps it past `wait` s."""
    uri = storage.join(root, LEASE)
    token = uuid.uuid4().hex
    mine = {"owner": owner, "token": token, "host": socket.gethostname(), "pid": os.getpid()}
    deadline = time.monotonic() + wait
    while True:
        held = _read(uri)
        if held is None or held.get("token") == token or is_stale(held, ttl):
            storage.write_bytes(uri, json.dumps({**mine, "heartbeat": time.time()}).encode())
            time.sleep(settle)
            if (_read(uri) or {}).get("token") == token:
                break
            continue
        if time.monotonic() > deadline:
            age = time.time() - float(held.get("heartbeat", 0))
            raise RootBusy(f"storage root {root!r} is in use by {held.get('owner')!r} (pid {held.get('pid')} on "
                           f"{held.get('host')}, heartbeat {age:.0f} s ago); wait for that run to finish, or stop it "
                           f"(its lease goes stale {ttl:.0f} s after its last heartbeat)")
        time.sleep(min(2.0, ttl / 3))
    stop = threading.Event()

    def beat():
        while not stop.wait(ttl / 3):
            try:
                if (_read(uri) or {}).get("token") != token:
                    return  # taken over (we were presumed dead): stop touching it
                storage.write_bytes(uri, json.dumps({**mine, "heartbeat": time.time()}).encode())
            except OSError as e:  # a storage hiccup: the next beat tries again, well within the ttl
                logging.getLogger(__name__).warning("lease heartbeat on %s failed: %s", uri, e)

    thread = threading.Thread(target=beat, name=f"lease:{root}", daemon=True)
    thread.start()
    try:
        yield mine
    finally:
        stop.set()
        thread.join(timeout=5)
        try:
            if (_read(uri) or {}).get("token") == token:
                storage.delete(uri)
        except OSError as e:  # never mask the run's own outcome: the lease goes stale after ttl
            logging.getLogger(__name__).warning("lease on %s not released: %s", uri, e)
