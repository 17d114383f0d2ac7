"""A two-node Ray cluster on one machine that behaves like two machines (tests/test_multinode.py).

The head node (`ray start --head`, token auth, dashboard on 127.0.0.1, custom resource {"head": 1}) and a worker
node (`ray start --address`, its own temp dir, {"worker_node": 1000}) run as separate process groups. The worker
node runs in its own mount namespace (`unshare --mount --propagation private`, root only) where tmpfs hides
/tmp, the head's Ray temp dir, the test's folders and the repository's runs/: a file one node writes under those
paths is invisible to the other, so the nodes share only Ray itself and the S3 API (moto on loopback; the
network namespace stays shared).

Ray's single-machine mode (what `microdit up` and the `ray_head` fixture use, every listener on loopback)
admits no second node, so both nodes and their drivers run in Ray's multi-node mode (test-only): their
listeners follow the machine's own IP, as on two machines. Token auth stays on.
Every process group is ours (start_new_session) and is stopped by its group id, never by name.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
HEAD_RESOURCE, WORKER_RESOURCE = "head", "worker_node"
# The nodes' custom resources, as infra/ray-cluster.aws.yaml and infra/kuberay-raycluster.yaml declare them
# (tests/test_infra.py checks): placement labels whose count never limits how much runs on a node at once.
NODE_RESOURCES = {"head": {HEAD_RESOURCE: 1}, "worker": {WORKER_RESOURCE: 1000}}


def unshare_available() -> str | None:
    """None when this process may make a private mount namespace with tmpfs mounts, else why not."""
    if shutil.which("unshare") is None:
        return "util-linux `unshare` is not installed"
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                       capture_output=True, text=True)
    return None if r.returncode == 0 else f"cannot mount tmpfs in a private mount namespace: {r.stderr.strip()}"


def _ray_ok(address: str, env: dict[str, str]) -> tuple[bool, str]:
    r = subprocess.run([str(BIN / "ray"), "status", f"--address={address}"], capture_output=True, text=True,
                       env=env, timeout=90)
    return r.returncode == 0, r.stdout


def _wait(check, timeout: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}; see {log}:\n{log.read_text()[-3000:]}")
        if check():
            return
        time.sleep(1)
    raise TimeoutError(f"{what} did not come up within {timeout:.0f}s; see {log}")


@dataclass
class Cluster:
    """The head (ours, on loopback) and the current worker node (in its own mount namespace)."""

    address: str
    head: subprocess.Popen | None
    state: Path  # logs of both nodes
    hidden: list[str]  # paths the worker node sees as empty tmpfs
    worker_cpus: int
    worker: subprocess.Popen | None = None
    temp_dirs: list[str] = field(default_factory=list)
    workers_started: int = 0

    def client_env(self) -> dict[str, str]:
        """Environment of a process that joins this cluster (a node or a driver): its address, token auth, and
        Ray's multi-node mode (the nodes listen on the machine's IP; single-machine mode admits no second node)."""
        from cli.stack import RAY_AUTH

        return dict(os.environ, **RAY_AUTH, RAY_ADDRESS=self.address, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1")

    def nodes_with(self, resource: str) -> int:
        """1 when registered nodes offer `resource` (`ray status` sums it over the nodes), else 0."""
        try:
            ok, out = _ray_ok(self.address, self.client_env())
        except subprocess.TimeoutExpired:
            return 0
        # `ray status` lists resources in total: "0.0/1000.0 worker_node"
        totals = [line.split()[0] for line in out.splitlines() if line.strip().endswith(f" {resource}")]
        return sum(float(t.split("/")[1]) > 0 for t in totals) if ok else 0

    def start_worker(self, timeout: float = 180, attempts: int = 3) -> None:
        """A fresh worker node (new temp dir, new mounts) joining the head; waits until GCS counts its resource.

        `ray start` gives a node's raylet a fixed 30 s to register, which a loaded 2-core machine can miss: a
        node that exits while starting is started again (a new temp dir), up to `attempts` times.
        """
        for attempt in range(attempts):
            try:
                return self._start_worker_once(timeout)
            except RuntimeError:  # exited while starting; TimeoutError (never registered) is not retried
                if attempt == attempts - 1:
                    raise

    def _start_worker_once(self, timeout: float) -> None:
        assert self.worker is None or self.worker.poll() is not None, "a worker node is running already"
        self.workers_started += 1
        temp = f"/tmp/rw{os.getpid()}-{self.workers_started}"  # inside the tmpfs: private to the worker node
        ports = agent_ports()
        ray_start = [str(BIN / "ray"), "start", "--block", f"--address={self.address}", f"--temp-dir={temp}",
                     f"--num-cpus={self.worker_cpus}", f"--resources={json.dumps(NODE_RESOURCES['worker'])}",
                     "--object-store-memory=400000000", "--disable-usage-stats", *ports]
        mounts = " && ".join(f"mount -t tmpfs tmpfs {shlex.quote(p)}" for p in outermost(self.hidden))
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               f"{mounts} && exec {shlex.join(ray_start)}"]
        # The auth token's file lies under the hidden /tmp: hand the token itself, as a real node's env would.
        token = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        env = dict(self.client_env(), RAY_AUTH_TOKEN=token)
        env.pop("RAY_AUTH_TOKEN_PATH", None)
        log = self.state / f"worker{self.workers_started}.log"
        with open(log, "w") as f:
            self.worker = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                           start_new_session=True)
        _wait(lambda: self.nodes_with(WORKER_RESOURCE) == 1, timeout, "ray worker node", self.worker, log)

    def stop(self) -> None:
        from conftest import _stop_group

        for proc in (self.worker, self.head):
            if proc is not None:
                _stop_group(proc)
        for d in self.temp_dirs:
            shutil.rmtree(d, ignore_errors=True)


def outermost(paths: list[str]) -> list[str]:
    """The existing paths not inside another of them (a tmpfs over /tmp hides /tmp/x already)."""
    real = sorted({os.path.realpath(p) for p in paths if os.path.isdir(p)})
    return [p for p in real if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in real)]


def agent_ports() -> list[str]:
    """Every agent port of a node, chosen here. Ray fixes one (52365), which two nodes on one IP cannot share, and
    picks the others when the agents start; its raylet then waits for their port files, and `ray start` gives
    the node a fixed 30 s to register, which the agents' start-up misses on a loaded 2-core machine."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_ip() -> str:
    """The machine's own IP, the address both nodes listen on (as on two machines; not loopback)."""
    from ray._private.services import node_ip_address_from_perspective

    return node_ip_address_from_perspective(None)


def start_cluster(state: Path, hidden: list[str], head_cpus: int = 1, worker_cpus: int = 2) -> Cluster:
    """Head (with {"head": 1}) plus one worker node; `hidden` are the paths the worker node must not see."""
    from conftest import _stop_group
    from cli.stack import ray_head_command

    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port, dash, client = free_port(), free_port(), free_port()
    extra = (f"--resources={json.dumps(NODE_RESOURCES['head'])}", "--object-store-memory=400000000",
             *agent_ports())
    ip = node_ip()
    cmd = [f"--node-ip-address={ip}" if a.startswith("--node-ip-address=") else a
           for a in ray_head_command(port, dash, client, temp, head_cpus, extra)]
    cluster = Cluster(f"{ip}:{port}", None, state, sorted({*hidden, temp}), worker_cpus, temp_dirs=[temp])
    try:
        for attempt in range(3):  # `ray start` gives a node 30 s to register; a loaded machine can miss it
            log = state / f"head{attempt}.log"
            with open(log, "w") as f:
                cluster.head = subprocess.Popen(cmd, env=cluster.client_env(), stdout=f, stderr=subprocess.STDOUT,
                                                start_new_session=True)
            try:
                _wait(lambda: cluster.nodes_with(HEAD_RESOURCE) == 1, 180, "ray head", cluster.head, log)
                break
            except (RuntimeError, TimeoutError):  # failed to start: clear what it left (GCS, raylet), again
                if attempt == 2:
                    raise
                _stop_group(cluster.head)
        cluster.start_worker()
    except BaseException:
        cluster.stop()
        raise
    return cluster
