"""Connect to the Ray cluster a step runs on: an explicit address, $RAY_ADDRESS, or a new local head."""
from __future__ import annotations

import logging
import os

from pipeline.core import storage

log = logging.getLogger(__name__)


def connect(address: str | None = None, *, num_cpus: int | None = None) -> str:
    """Make this process a Ray driver and return the cluster's GCS address.

    `address` (or $RAY_ADDRESS) joins an existing cluster; with neither, a local head starts with its
    dashboard on 127.0.0.1. Already connected: nothing happens. Workers get the driver's non-secret S3
    settings (endpoint, region) so storage URIs resolve the same everywhere.
    """
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        runtime_env = {"env_vars": storage.forwarded_env()}
        if address:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        else:
            # "local", not None: None makes Ray join whatever cluster {RAY_TMPDIR}/ray/ray_current_cluster names,
            # and a stale file left by a dead `ray start` then hangs the step in connection retries.
            ctx = ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                           runtime_env=runtime_env)
            log.info("started a local Ray head; dashboard at http://%s", ctx.dashboard_url)
    return ray.get_runtime_context().gcs_address
