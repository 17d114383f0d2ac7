"""Every socket the local Ray head listens on is on loopback: the head `microdit up` starts (via the session's
`ray_head` fixture, same command and environment) and the head `connect()` starts without an address.

Sockets are read from /proc for the processes of that Ray session only: the descendants of the process that
started it (GCS, raylet, dashboard, agents, client server, workers) and the driver, never by process name.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from sockets import assert_loopback_only, descendants, is_loopback_ip, listening_sockets


def _exercise(ray) -> list[int]:
    """A task and an actor, so worker processes (each with its own gRPC server) exist; returns their pids."""
    @ray.remote
    def pid():
        return os.getpid()

    @ray.remote
    class Actor:
        def pid(self):
            return os.getpid()

    actor = Actor.remote()
    return [ray.get(pid.remote()), ray.get(actor.pid.remote())]


def test_ip_classification():
    assert all(map(is_loopback_ip, ["127.0.0.1", "::1", "::ffff:127.0.0.1"]))
    assert not any(map(is_loopback_ip, ["0.0.0.0", "::", "192.0.2.2", "::ffff:192.0.2.2"]))
    from pipeline.core.ray_cluster import is_loopback

    assert is_loopback("127.0.0.1:6379") and is_loopback("[::1]:6379") and is_loopback("localhost:1")
    assert not is_loopback("10.0.0.5:6379") and not is_loopback("auto")


@pytest.mark.slow
def test_local_stack_ray_head_listens_on_loopback_only(ray_head):
    """The head as `microdit up` starts it, a driver connected to it, and its workers: loopback only."""
    import ray

    from pipeline.core.ray_cluster import connect

    address, head_pid = ray_head
    connect(address)
    try:
        workers = _exercise(ray)
        pids = descendants(head_pid) + [os.getpid()]
        assert set(workers) <= set(pids)
        socks = listening_sockets(pids)
        assert_loopback_only(socks, must_include_ports=[int(address.rsplit(":", 1)[1])])
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_connect_without_address_starts_a_loopback_only_head(tmp_path):
    """connect() with no address starts a head via ray.init; it must not listen beyond loopback either,
    even in a shell without the stack's environment (connect sets single-machine mode itself)."""
    tmp = tempfile.mkdtemp(prefix="rl", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    token = tmp_path / "token"
    token.write_text(uuid.uuid4().hex * 2)
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env.update(RAY_TMPDIR=tmp, RAY_AUTH_TOKEN_PATH=str(token))  # never the user's ~/.ray/auth_token
    code = ("import sys, ray; sys.path.insert(0, %r); from test_listeners import _exercise; "
            "from pipeline.core.ray_cluster import connect; gcs = connect(num_cpus=1); _exercise(ray); "
            "print('READY', gcs, flush=True); sys.stdin.readline(); ray.shutdown()") % str(Path(__file__).parent)
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY "), proc.stderr.read()[-3000:] if proc.poll() is not None else line
        gcs = line.split()[1]
        socks = listening_sockets(descendants(proc.pid))
        assert gcs.startswith("127.0.0.1:"), gcs
        assert_loopback_only(socks, must_include_ports=[int(gcs.rsplit(":", 1)[1])])
    finally:
        if proc.poll() is None:
            proc.stdin.write("\n")
            proc.stdin.flush()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)  # our own process group only
                proc.wait()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
