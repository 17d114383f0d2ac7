"""What the session's Ray head records, read over its dashboard API with the session's token (no helpers that
guess "the" cluster): Ray Train runs with their attempts."""
from __future__ import annotations

import json
import urllib.request
from pathlib import Path


def get_json(url: str, token_path: str | Path, body: dict | None = None, timeout: float = 60):
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    req.add_header("Authorization", f"Bearer {Path(token_path).read_text().strip()}")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def train_runs(dashboard: str, token_path: str | Path) -> list[dict]:
    """Every Ray Train run the head recorded ({id, name, status, attempts: [...]}, ...); training tasks and the
    test session turn Train state tracking on."""
    return get_json(f"{dashboard}/api/train/v2/runs/v1", token_path).get("train_runs", [])
