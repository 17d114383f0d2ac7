"""The checkpoint signing key and HMAC-SHA256 over JSON manifests.

Checkpoints hold pickles (DCP's `.metadata`) and live on shared storage, so whoever can write to storage
could otherwise run code on every training machine. Each rank's manifest (names, sizes, SHA-256 of its files)
is signed with a key that never lives in storage, and nothing of a checkpoint is unpickled before its
signature and hashes are checked.

The key: $MICRODIT_CHECKPOINT_KEY (at least 32 characters; set the same value on every machine that writes or
resumes checkpoints, e.g. from a secret manager), else a per-user file `~/.config/microdit/checkpoint.key`
($XDG_CONFIG_HOME respected), created with a random 256-bit key and mode 0600 on first use. A per-user file,
not the run's state folder: `runs/.stack` sits beside local storage roots, and a key that outlives one
`microdit up` keeps older checkpoints resumable. Ray workers get the driver's key from the cluster's
key-value store (in GCS memory, under this job's id; put there by `pipeline.core.ray_cluster.connect`), so
remote workers need no file. Not through runtime_env env_vars: Ray's runtime-env agent writes their values
into its log. The key is never logged and never written to storage.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
import sys
from pathlib import Path
from typing import Any

KEY_ENV = "MICRODIT_CHECKPOINT_KEY"
MIN_KEY_CHARS = 32
_KV_NAMESPACE = "microdit"


def key_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "microdit" / "checkpoint.key"


def _read_or_create_key_file(path: Path) -> str:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:  # O_EXCL: two processes creating it at once agree on the first one's key
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
        except FileExistsError:
            pass
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"checkpoint key file {str(path)!r} is readable or writable by others "
                         f"(mode {stat.filemode(mode)}); run `chmod 600 {path}`")
    key = path.read_text().strip()
    if len(key) < MIN_KEY_CHARS:
        raise ValueError(f"checkpoint key file {str(path)!r} holds a key shorter than {MIN_KEY_CHARS} characters")
    return key


def _ray_job_kv_name() -> bytes | None:
    """This process's Ray job's entry in the cluster key-value store; None outside a connected Ray process."""
    ray = sys.modules.get("ray")  # never import Ray just to look
    if ray is None or not ray.is_initialized():
        return None
    return f"checkpoint_key/{ray.get_runtime_context().get_job_id()}".encode()


def share_with_ray_job() -> None:
    """On a Ray driver: make this process's key the one its job's workers use (see the module docstring)."""
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(_ray_job_kv_name(), _own_key().encode(), overwrite=True, namespace=_KV_NAMESPACE)


def _own_key() -> str:
    key = os.environ.get(KEY_ENV, "").strip()
    if key:
        if len(key) < MIN_KEY_CHARS:
            raise ValueError(f"${KEY_ENV} is shorter than {MIN_KEY_CHARS} characters; use e.g. "
                             "`python -c 'import secrets; print(secrets.token_hex(32))'`")
        return key
    return _read_or_create_key_file(key_file())


def checkpoint_key() -> str:
    """The signing key: $MICRODIT_CHECKPOINT_KEY, else (in a Ray worker) the driver's, else the per-user file."""
    if os.environ.get(KEY_ENV, "").strip():
        return _own_key()
    name = _ray_job_kv_name()
    if name is not None:
        from ray.experimental.internal_kv import _internal_kv_get

        shared = _internal_kv_get(name, namespace=_KV_NAMESPACE)
        if shared:
            return shared.decode()
    return _own_key()


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign(body: dict[str, Any], key: str | None = None) -> str:
    """Hex HMAC-SHA256 of a JSON-able dict (canonical form: sorted keys, no spaces)."""
    return hmac.new((key or checkpoint_key()).encode(), _canonical(body), hashlib.sha256).hexdigest()


def signature_ok(body: dict[str, Any], signature: Any, key: str | None = None) -> bool:
    return isinstance(signature, str) and hmac.compare_digest(sign(body, key), signature)
