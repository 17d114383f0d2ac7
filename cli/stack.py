"""The local stack behind `microdit up/down/status`: a Prefect server, a Ray head and the deployments' server.

Each service is started as its own process group (start_new_session) and its pid, command line and log are
recorded in `{state}/stack.json`; `down` stops exactly those groups, after checking that the recorded pid still
runs the recorded command (a recycled pid is left alone). Nothing is ever found or stopped by name.
All three share PREFECT_HOME, PREFECT_API_URL and RAY_ADDRESS, written once into the state file.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.core.ray_cluster import LOOPBACK_ENV

BIN = Path(sys.executable).parent
# Ray 2.60 local clusters use token auth; clients only send the token (~/.ray/auth_token) in token mode.
RAY_AUTH = {"RAY_AUTH_MODE": "token"}
# Every Ray process of the head and every client of it: token auth, and single-machine mode so that all Ray
# listeners bind 127.0.0.1 (see pipeline.core.ray_cluster; without it `--node-ip-address=127.0.0.1` is
# rewritten to the external IP and GCS/raylet listen on all interfaces).
RAY_ENV = {**RAY_AUTH, **LOOPBACK_ENV}
STATE_FILE = "stack.json"
SERVICES = ("prefect", "ray", "serve")


class StackError(RuntimeError):
    """A service of the local stack is missing or failed to start; the message says what to do."""


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of a process, None if there is none."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "
    return fields[0], int(fields[19])


@dataclass
class Proc:
    """A process group we started: its leader's pid and start time (so a recycled pid never matches), command, log."""

    pid: int
    cmd: list[str]
    log: str
    start_ticks: int = 0

    def alive(self) -> bool:
        """True while the recorded pid is the process we started and has not exited."""
        st = _stat(self.pid)
        return st is not None and st[1] == self.start_ticks and st[0] not in ("Z", "X")

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM the whole group, then SIGKILL what is left after `grace` seconds."""
        if not self.alive():
            return
        try:
            os.killpg(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _group_exists(self.pid):
            time.sleep(0.3)
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class Stack:
    """Addresses and processes of one local stack, persisted as {state_dir}/stack.json."""

    state_dir: str
    api_url: str = ""
    ui_url: str = ""
    ray_address: str = ""
    dashboard_url: str = ""
    ray_temp_dir: str = ""
    workdir: str = ""
    processes: dict[str, Proc] = field(default_factory=dict)

    @property
    def prefect_home(self) -> str:
        return str(Path(self.state_dir) / "prefect")

    def env(self) -> dict[str, str]:
        """Environment every process of this stack (and every client of it) shares."""
        env = {"PREFECT_HOME": self.prefect_home, "PREFECT_API_URL": self.api_url,
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{self.prefect_home}/prefect.db",
               "PREFECT_RUNNER_POLL_FREQUENCY": "2", **RAY_ENV}
        if self.ray_address:
            env["RAY_ADDRESS"] = self.ray_address
        return env

    def save(self) -> None:
        path = Path(self.state_dir) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, state_dir: str | Path) -> "Stack | None":
        path = Path(state_dir) / STATE_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        data["processes"] = {k: Proc(**v) for k, v in data.get("processes", {}).items()}
        return cls(**data)

    def alive(self, service: str) -> bool:
        proc = self.processes.get(service)
        return proc is not None and proc.alive()


def default_state_dir() -> Path:
    """$MICRODIT_HOME, else ./runs/.stack under the current directory."""
    return Path(os.environ.get("MICRODIT_HOME") or Path.cwd() / "runs" / ".stack").resolve()


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def pick_port(preferred: int) -> int:
    """`preferred` if nothing listens there, else (or for 0) a free port the OS picks."""
    if preferred and port_free(preferred):
        return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(cmd: list[str], log: Path, env: dict[str, str], cwd: str | None = None) -> Proc:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, **env), cwd=cwd,
                             stdin=subprocess.DEVNULL, start_new_session=True)
    st = _stat(p.pid)
    return Proc(p.pid, cmd, str(log), st[1] if st else -1)


def _wait(check, timeout: float, what: str, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and not proc.alive():
            raise StackError(f"{what} exited while starting; see {proc.log}")
        time.sleep(0.5)
    raise StackError(f"{what} did not come up within {timeout:.0f}s; see {proc.log if proc else 'its log'}")


# ------------------------------------------------------------------------------------------ checks

def prefect_healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=3) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def ray_healthy(address: str) -> bool:
    """`ray status` answers for this address (it carries the token when auth is on)."""
    if not address:
        return False
    env = dict(os.environ, **RAY_ENV)
    try:
        r = subprocess.run([str(BIN / "ray"), "status", f"--address={address}"], capture_output=True, timeout=90,
                           env=env)
    except subprocess.TimeoutExpired:
        return False
    return r.returncode == 0


def ray_token_path() -> Path:
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def ensure_ray_token() -> None:
    """Create the Ray auth token file (RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token) if there is none: random,
    mode 0600 in a 0700 folder. In explicit token mode `ray start` refuses to make one."""
    path = ray_token_path()
    if os.environ.get("RAY_AUTH_TOKEN") or path.is_file():
        return
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another `up` made it meanwhile
        return
    except OSError as e:
        raise StackError(f"could not create the Ray auth token file {path}: {e}") from None
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


def deployments_ready(since: float, names=("microdit/full-run", "microdit/stage", "microdit/compare")) -> bool:
    """Every deployment exists and was polled by a runner after `since` (a UNIX time)."""
    # Prefect's client is a second of imports that `down` and `status` do not need: only here.
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for name in names:
            try:
                dep = client.read_deployment_by_name(name)
            except ObjectNotFound:
                return False
            if dep.last_polled is None or dep.last_polled.timestamp() < since:
                return False
    return True


# ------------------------------------------------------------------------------------------ up/down

def ray_head_command(port: int, dashboard_port: int, client_port: int, temp_dir: str, num_cpus: int | None = None,
                     extra: tuple[str, ...] = ()) -> list[str]:
    """`ray start --head` with every listener on loopback (run it with `ray_head_env`).

    Node IP, dashboard and the Ray Client server are 127.0.0.1 here; GCS, raylet, workers, the dashboard and
    runtime-env agents and the metrics export ports follow the node IP once single-machine mode keeps it there.
    """
    return [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
            f"--ray-client-server-port={client_port}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
            *([f"--num-cpus={num_cpus}"] if num_cpus else []), *extra]


def ray_head_env(port: int) -> dict[str, str]:
    """Environment of the head's processes (workers inherit it): token auth, loopback only, and this cluster's
    address, so Ray's own helpers never pick another local instance ("Found multiple active Ray instances")."""
    return dict(RAY_ENV, RAY_ADDRESS=f"127.0.0.1:{port}")


def up(state_dir: Path | None = None, *, prefect_port: int = 4200, ray_port: int = 6379,
       dashboard_port: int = 8265, num_cpus: int | None = None, log=print) -> Stack:
    """Start whatever of the stack is not running yet; returns the stack with its addresses."""
    state_dir = Path(state_dir or default_state_dir())
    state_dir.mkdir(parents=True, exist_ok=True)
    stack = Stack.load(state_dir) or Stack(str(state_dir))
    Path(stack.prefect_home).mkdir(parents=True, exist_ok=True)
    logs = state_dir / "logs"
    restarted = []  # services started anew: the deployment server holds their old addresses in its environment

    if not (stack.alive("prefect") and prefect_healthy(stack.api_url)):
        port = pick_port(prefect_port)
        stack.api_url, stack.ui_url = f"http://127.0.0.1:{port}/api", f"http://127.0.0.1:{port}"
        env = dict(stack.env(), PREFECT_UI_API_URL=stack.api_url)
        env.pop("PREFECT_API_URL")  # the server itself must not try to reach an API
        proc = _spawn([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                      logs / "prefect.log", env)
        stack.processes["prefect"] = proc
        stack.save()
        restarted.append("prefect")
        log(f"starting Prefect server on {stack.ui_url} (log {proc.log})")
        _wait(lambda: prefect_healthy(stack.api_url), 180, "prefect server", proc)

    if not (stack.alive("ray") and ray_healthy(stack.ray_address)):
        port, dash, client = pick_port(ray_port), pick_port(dashboard_port), pick_port(10001)
        # Ray's unix socket paths must fit 107 bytes: keep the temp dir short and per state dir.
        stack.ray_temp_dir = f"/tmp/microdit-ray-{hashlib.sha1(str(state_dir).encode()).hexdigest()[:8]}"
        ensure_ray_token()
        proc = _spawn(ray_head_command(port, dash, client, stack.ray_temp_dir, num_cpus), logs / "ray.log",
                      ray_head_env(port))
        stack.processes["ray"] = proc
        stack.ray_address, stack.dashboard_url = f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
        stack.save()
        restarted.append("ray")
        log(f"starting Ray head at {stack.ray_address}, dashboard {stack.dashboard_url} (log {proc.log})")
        _wait(lambda: ray_healthy(stack.ray_address), 180, "ray head", proc)

    if restarted and stack.alive("serve"):  # its flows would run against the dead services' addresses
        log(f"restarting the deployment server: {' and '.join(restarted)} started anew")
        stack.processes.pop("serve").stop()
    if not stack.alive("serve"):
        since = time.time()
        stack.workdir = str(Path.cwd())
        proc = _spawn([sys.executable, "-m", "flows.serve"], logs / "serve.log", stack.env(), cwd=stack.workdir)
        stack.processes["serve"] = proc
        stack.save()
        log(f"serving deployments microdit/full-run and microdit/stage (log {proc.log})")
        _with_env(stack, lambda: _wait(lambda: deployments_ready(since), 180, "deployment server", proc))
    stack.save()
    return stack


def down(state_dir: Path | None = None, log=print) -> list[str]:
    """Stop the recorded process groups (serve first, the server last); returns the names stopped."""
    state_dir = Path(state_dir or default_state_dir())
    stack = Stack.load(state_dir)
    if stack is None:
        raise StackError(f"no local stack recorded in {state_dir} (nothing to stop)")
    stopped = []
    for name in ("serve", "ray", "prefect"):
        proc = stack.processes.get(name)
        if proc is not None and proc.alive():
            log(f"stopping {name} (process group {proc.pid})")
            proc.stop()
            stopped.append(name)
        stack.processes.pop(name, None)
    stack.save()
    return stopped


def _with_env(stack: Stack, fn):
    """Run fn with this stack's Prefect settings in os.environ (the client reads them from there)."""
    saved = {k: os.environ.get(k) for k in stack.env()}
    os.environ.update(stack.env())
    try:
        return fn()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def require(state_dir: Path | None = None, services=SERVICES) -> Stack:
    """The running stack, or a StackError saying which service is down and how to start it."""
    state_dir = Path(state_dir or default_state_dir())
    stack = Stack.load(state_dir)
    if stack is None:
        raise StackError(f"the local stack is not up (no {state_dir / STATE_FILE}); start it with `microdit up`")
    for name in services:
        if not stack.alive(name):
            raise StackError(f"{_LABEL[name]} is not running (state {state_dir}); start it with `microdit up`")
    if "prefect" in services and not prefect_healthy(stack.api_url):
        raise StackError(f"the Prefect server at {stack.api_url} does not answer; restart with "
                         "`microdit down && microdit up`")
    return stack


_LABEL = {"prefect": "the Prefect server", "ray": "the Ray head", "serve": "the deployment server (flows.serve)"}
