"""Connect to the Ray cluster a step runs on: an explicit address, $RAY_ADDRESS, or a new local head.

A local head listens on loopback only. Ray 2.60 rewrites a node IP of 127.0.0.1 to the machine's external IP
(`ray._private.services.resolve_ip_for_localhost`) and then binds GCS, raylet, workers and agents on all
interfaces (GCS and raylet on `::`), the client server and agents on the external IP. Its single-machine mode
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, Ray's default on macOS) keeps the node IP at 127.0.0.1, and every Ray
process then binds 127.0.0.1 (its gRPC servers listen on localhost only when the node IP is 127.0.0.1). No other
node can join such a head, which is the point; a multi-node cluster is started by `infra/`, not here.
"""
from __future__ import annotations

import logging
import os

from pipeline.core import signing, storage

log = logging.getLogger(__name__)
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # set for every process of a local head and its clients


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    return host == "localhost" or host == "::1" or host.startswith("127.")


def maybe_loopback_only(address: str | None) -> None:
    """For a new local head (None) or a loopback address: single-machine mode here and in what Ray starts from here.

    Ray reads the setting once, at import: the environment covers processes started from here, the constant this
    process (a driver must agree with the head on the node IP, or it looks for a raylet on the external IP).
    """
    if address is not None and not is_loopback(address):
        return
    from ray._private import ray_constants  # pinned Ray 2.60; services.get_node_ip_address reads it per call

    os.environ.update(LOOPBACK_ENV)
    ray_constants.ENABLE_RAY_CLUSTER = False


def connect(address: str | None = None, *, num_cpus: int | None = None) -> str:
    """Make this process a Ray driver and return the cluster's GCS address.

    `address` (or $RAY_ADDRESS) joins an existing cluster; with neither, a local head starts with all its
    listeners (dashboard included) on 127.0.0.1. Workers get the driver's non-secret S3 settings (endpoint,
    region) so storage URIs resolve the same everywhere. Connected or already connected, the driver's checkpoint
    signing key goes to the cluster's key-value store for this job (`signing.share_with_ray_job`: in GCS
    memory, readable by holders of the cluster's auth token, who can run code on it anyway), so its workers
    sign and verify checkpoints like the driver. The key is never logged nor written to storage.
    """
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        runtime_env = {"env_vars": storage.forwarded_env()}
        maybe_loopback_only(address)
        if address:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        else:
            # "local", not None: None makes Ray join whatever cluster {RAY_TMPDIR}/ray/ray_current_cluster names,
            # and a stale file left by a dead `ray start` then hangs the step in connection retries.
            ctx = ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                           runtime_env=runtime_env)
            log.info("started a local Ray head; dashboard at http://%s", ctx.dashboard_url)
    signing.share_with_ray_job()
    return ray.get_runtime_context().gcs_address
