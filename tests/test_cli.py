"""The `microdit` CLI: plain errors when nothing is up, `down` stops exactly what was recorded, a real up/down."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cli import stack as local_stack
from cli.stack import Proc, Stack

MICRODIT = str(Path(sys.executable).parent / "microdit")
REPO = Path(__file__).resolve().parents[1]


def microdit(*args: str, state: Path, timeout: int = 120, **extra_env: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "RAY_ADDRESS")} | extra_env
    return subprocess.run([MICRODIT, "--state-dir", str(state), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize("args", [["status"], ["run"], ["stage", "stage1"], ["compare"], ["down"]])
def test_nothing_up_gives_a_plain_error(tmp_path, args):
    r = microdit(*args, state=tmp_path / "state")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "microdit: error:" in r.stderr
    assert "microdit up" in r.stderr or "nothing to stop" in r.stderr


def test_unknown_recipe_is_named(tmp_path):
    r = microdit("run", "--recipe", "nope.yaml", state=tmp_path)
    assert r.returncode != 0 and "nope.yaml" in r.stderr and "Traceback" not in r.stderr


def test_a_bad_recipe_is_named_before_the_stack(tmp_path):
    """With nothing up, what is wrong with the recipe comes first (not "start the stack"), naming key and value
    (`run`, `stage` and `compare` share the path)."""
    import yaml

    recipe = yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())
    recipe["download"]["processes"] = "two"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(recipe))
    (tmp_path / "stages_tiny.yaml").write_text((REPO / "recipes" / "stages_tiny.yaml").read_text())
    r = microdit("run", "--recipe", str(bad), state=tmp_path / "state")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "download.processes" in r.stderr and "two" in r.stderr and "microdit up" not in r.stderr, r.stderr


def test_ray_token_file_is_created_where_the_environment_points(tmp_path, monkeypatch):
    """RAY_AUTH_TOKEN_PATH naming a file that does not exist yet: `up` creates it, random, mode 0600, once."""
    path = tmp_path / "new" / "dir" / "token"
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    local_stack.ensure_ray_token()
    token = path.read_text()
    assert len(token) == 64 and int(token, 16) >= 0
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    local_stack.ensure_ray_token()
    assert path.read_text() == token  # an existing token is kept


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "600"], start_new_session=True)


def _record(state: Path, **procs: subprocess.Popen | Proc) -> None:
    state.mkdir(parents=True, exist_ok=True)
    stack = Stack(str(state), api_url="http://127.0.0.1:9/api")
    for name, p in procs.items():
        stack.processes[name] = p if isinstance(p, Proc) else Proc(p.pid, p.args, "", local_stack._stat(p.pid)[1])
    stack.save()


def test_down_stops_exactly_the_recorded_groups(tmp_path):
    recorded, other = _sleeper(), _sleeper()
    try:
        _record(tmp_path, serve=recorded)
        r = microdit("down", state=tmp_path)
        assert r.returncode == 0, r.stderr
        assert "serve" in r.stdout
        assert recorded.wait(timeout=30) == -signal.SIGTERM
        assert other.poll() is None  # not ours to stop: same command, never matched by name
    finally:
        for p in (recorded, other):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def test_down_leaves_a_recycled_pid_alone(tmp_path):
    stranger = _sleeper()
    try:  # the recorded pid now belongs to a process started at another time: not ours
        _record(tmp_path, ray=Proc(stranger.pid, list(stranger.args), "", start_ticks=1))
        r = microdit("down", state=tmp_path)
        assert r.returncode == 0 and "nothing was running" in r.stdout
        time.sleep(0.5)
        assert stranger.poll() is None
    finally:
        os.killpg(stranger.pid, signal.SIGKILL)
        stranger.wait()


def test_status_reports_a_dead_service(tmp_path):
    gone = subprocess.Popen(["true"], start_new_session=True)
    ticks = local_stack._stat(gone.pid)[1]
    gone.wait()
    _record(tmp_path, prefect=Proc(gone.pid, ["true"], "", ticks))
    r = microdit("status", state=tmp_path)
    assert r.returncode != 0
    assert "DOWN" in r.stdout and "microdit up" in r.stderr and "Traceback" not in r.stderr


def _get(url: str, token: str | None = None) -> int:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
def test_up_status_down(tmp_path):
    state = tmp_path / "stack"
    try:
        r = microdit("up", "--prefect-port", "0", "--ray-port", "0", "--dashboard-port", "0", "--num-cpus", "1",
                     state=state, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        stack = Stack.load(state)
        assert {"prefect", "ray", "serve"} == set(stack.processes)
        assert stack.ray_address.startswith("127.0.0.1:") and stack.dashboard_url.startswith("http://127.0.0.1:")
        assert "Ray dashboard" in r.stdout and stack.dashboard_url in r.stdout
        assert local_stack.prefect_healthy(stack.api_url)
        token = local_stack.ray_token_path().read_text().strip()
        assert _get(f"{stack.dashboard_url}/api/version", token) == 200
        assert _get(f"{stack.dashboard_url}/api/version") == 401  # token auth on: no token, no dashboard API

        s = microdit("status", state=state, timeout=300)
        assert s.returncode == 0, s.stdout + s.stderr
        assert "DOWN" not in s.stdout and "no flow runs yet" in s.stdout

        again = microdit("up", state=state, timeout=300)  # idempotent: nothing new started
        assert again.returncode == 0 and "starting" not in again.stdout
        assert {k: p.pid for k, p in Stack.load(state).processes.items()} == \
            {k: p.pid for k, p in stack.processes.items()}

        stack.processes["ray"].stop()  # the head dies (a reboot, an OOM kill): `up` starts a new one, and the
        revived = microdit("up", state=state, timeout=600)  # deployment server anew, on the new head's address
        assert revived.returncode == 0, revived.stdout + revived.stderr
        assert "starting Ray head" in revived.stdout and "restarting the deployment server" in revived.stdout
        new = Stack.load(state)
        assert new.processes["prefect"].pid == stack.processes["prefect"].pid
        assert new.processes["serve"].pid != stack.processes["serve"].pid
        assert not local_stack._group_exists(stack.processes["serve"].pid)
        stack = new
    finally:
        d = microdit("down", state=state, timeout=300)
    assert d.returncode == 0, d.stderr
    assert set(d.stdout.split("stopped: ")[1].strip().split(", ")) == {"serve", "ray", "prefect"}
    for p in stack.processes.values():
        assert not local_stack._group_exists(p.pid)
    assert json.loads((state / "stack.json").read_text())["processes"] == {}
