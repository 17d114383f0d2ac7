"""Shared fixtures: every service a test needs is started here, owned by the test session, and torn down.

Services are started as process groups we created ourselves and stopped by group id, never by name, so
several test sessions (or a user's own Ray/Prefect) on the same machine do not disturb each other.

The suite's time is process start-ups: a Ray Train stage costs 20-40 CPU-seconds of actors and workers before its
first step, a flow run more. So integration tests share what is expensive (tests/shared_runs.py): the tiny MicroDiT
flow run (`tiny_flow`) and the E-MMDiT flow run on S3 (`emmdit_flow`). A new test that needs a trained export, cached
latents, a flow run's artifacts or a Train run's record reads one of those (joining its xdist group) or adds its
check to the run that already trains; it starts its own Ray Train job or flow run only to kill, resume or race one,
with one worker unless it tests distribution, at the fewest steps that prove it. `pytest --census` prints what each
file started (tests/census.py).

Scheduling (`make test`: `pytest -n 2`): every file is a unit of work of its own, except the files that read one
shared run, listed in SHARED_RUNS below: they form one unit, run on one worker, so the run is made once. (xdist's own
`--dist loadgroup` cannot do it with pytest 9.2: it renames node ids through `item._nodeid`, which pytest no longer
reads, so marked groups are split across workers.)
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

import census

pytest_plugins = ["census", "shared_runs"]

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not come up within {timeout:.0f}s")


def _stop_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """Stop a process group started with start_new_session=True: SIGTERM, then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


# The files that read each shared run (tests/shared_runs.py): one unit of work, on one worker. A file that starts
# reading a shared run is added here (tests/test_architecture.py checks that none is missing).
SHARED_RUNS = {"test_flows.py": "tiny_flow", "test_compare_flow.py": "tiny_flow",
               "test_emmdit_flow.py": "emmdit_flow", "test_train_emmdit.py": "emmdit_flow"}
# Scheduling hint: the longest units (from `--durations`, 2 cores) start first so the two workers finish together
# instead of one running a long unit alone at the end. A unit missing here only costs balance; slow-marked files
# come next, then the rest in collection order.
LONGEST_FIRST = ["tiny_flow", "test_train_stage.py", "emmdit_flow", "test_cli.py", "test_multinode.py",
                 "test_gpu_suite.py", "test_download.py", "test_learns.py", "test_precompute.py"]


def unit_of(file_name: str) -> str:
    """The unit of work a test file belongs to: its shared run, else the file itself."""
    return SHARED_RUNS.get(file_name, file_name)


def pytest_xdist_make_scheduler(config, log):
    """xdist's file-at-a-time scheduling, with the files of one shared run as one unit (see the module docstring)."""
    from xdist.scheduler import LoadScopeScheduling

    class SharedRunScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return unit_of(file.rsplit("/", 1)[-1]) if file.rsplit("/", 1)[-1] in SHARED_RUNS else file

    return SharedRunScheduling(config, log)


def _schedule_rank(item) -> tuple[int, int]:
    unit = unit_of(item.path.name)
    if unit in LONGEST_FIRST:
        return (0, LONGEST_FIRST.index(unit))
    return (1, 0) if item.get_closest_marker("slow") else (2, 0)


def pytest_collection_modifyitems(config, items):
    import torch

    # A unit moves as a whole (the scheduler sends it to one worker); sorted() keeps each unit's own file order.
    units: dict[str, list] = {}
    for item in items:
        units.setdefault(unit_of(item.path.name), []).append(item)
    rank = {u: min(_schedule_rank(i) for i in its) for u, its in units.items()}
    items[:] = [i for u in sorted(units, key=lambda u: rank[u]) for i in units[u]]
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # Tests run tiny ops on 2 shared cores next to Ray workers: extra intra-op threads only spin.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def _fake_aws_credentials():
    # moto accepts any credentials; set them before Ray starts so its workers inherit them.
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ.setdefault(key, value)
    yield


@pytest.fixture(scope="session", autouse=True)
def _checkpoint_key():
    # A session key for checkpoint signing (pipeline.core.signing), so tests never create the user's
    # ~/.config/microdit/checkpoint.key; set before Ray starts so its workers inherit it too.
    env = pytest.MonkeyPatch()
    env.setenv("MICRODIT_CHECKPOINT_KEY", uuid.uuid4().hex + uuid.uuid4().hex)
    yield
    env.undo()


@pytest.fixture(scope="session", autouse=True)
def _ray_client_env(tmp_path_factory):
    """Token auth with this session's own token, and loopback-only (single-machine) mode, for every Ray head
    and client of the session. Set at session start: Ray reads both once per process, when it is imported.

    Ray 2.60 decides token auth from ~/.ray/auth_token, a file shared with every other Ray user on the
    machine; this session gets its own token, explicitly.
    """
    from cli.stack import RAY_ENV

    token = tmp_path_factory.mktemp("ray_token") / "auth_token"
    token.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
    token.chmod(0o600)
    env = pytest.MonkeyPatch()
    env.delenv("RAY_AUTH_TOKEN", raising=False)
    env.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    for key, value in RAY_ENV.items():
        env.setenv(key, value)
    # Ray Train's record of every stage in the dashboard, as the flow's training task turns it on (the census
    # counts Train runs there).
    env.setenv("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    census.SERVICES["token"] = str(token)
    yield token
    env.undo()


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A fresh local Ray head started the way `microdit up` starts it (every listener on loopback), owned by
    this test session; yields (GCS address, pid of `ray start`, whose descendants are the head's processes)."""
    from cli.stack import ray_head_command, ray_head_env

    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port, dash, client = free_port(), free_port(), free_port()
    state = tmp_path_factory.mktemp("ray")
    log = open(state / "head.log", "w")
    env = pytest.MonkeyPatch()
    proc = subprocess.Popen(
        ray_head_command(port, dash, client, temp_dir, 4, ("--object-store-memory=800000000",)),
        env=dict(os.environ, **ray_head_env(port)), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"ray head exited with {proc.returncode}; see {log.name}")
        r = subprocess.run([str(BIN / "ray"), "status", f"--address={address}"], capture_output=True)
        return r.returncode == 0

    try:
        _wait_until(up, 120, "ray head")
        env.setenv("RAY_ADDRESS", address)
        census.SERVICES["dashboard"] = f"http://127.0.0.1:{dash}"
        yield address, proc.pid
    finally:
        env.undo()
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except Exception:
            pass
        _stop_group(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_address(ray_head):
    """The GCS address of this session's local Ray head (see `ray_head`)."""
    return ray_head[0]


@pytest.fixture(scope="session")
def ray_train_runs(ray_head, _ray_client_env):
    """A callable listing the Ray Train runs the session's head recorded (tests/ray_state.py)."""
    from ray_state import train_runs

    return lambda: train_runs(census.SERVICES["dashboard"], _ray_client_env)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A Prefect server on a free loopback port with its own PREFECT_HOME and SQLite; yields its API URL.

    PREFECT_API_URL and PREFECT_HOME are exported for the rest of the session so that flows, workers and
    the `prefect` CLI started by tests all talk to this server.
    """
    home = tmp_path_factory.mktemp("prefect_home")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db",
               PREFECT_UI_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}; see {log.name}")
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    session_env = pytest.MonkeyPatch()
    try:
        _wait_until(up, 120, "prefect server")
        session_env.setenv("PREFECT_API_URL", api)
        session_env.setenv("PREFECT_HOME", str(home))
        census.SERVICES["prefect"] = api
        yield api
    finally:
        session_env.undo()
        _stop_group(proc)
        log.close()


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on loopback; yields the endpoint URL (credentials: the fake ones above)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh, empty bucket on the moto server; yields its name."""
    import uuid

    import boto3

    name = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    yield name
