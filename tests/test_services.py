"""The shared service fixtures start real services that answer."""
import json
import os
import urllib.request

import pytest

from pipeline.core import storage


@pytest.mark.slow
def test_ray_head_answers_with_dashboard(ray_address):
    import ray

    from pipeline.core import ray_cluster

    gcs = ray_cluster.connect(ray_address)
    assert gcs.rsplit(":", 1)[1] == ray_address.rsplit(":", 1)[1]  # Ray reports the node's own IP
    assert ray.get(ray.remote(lambda x: x * 2).remote(21)) == 42
    ray.shutdown()


@pytest.mark.slow
def test_without_an_address_a_stale_ray_start_file_is_ignored():
    """No address and no $RAY_ADDRESS: a new local head, even where a dead `ray start` left its address file."""
    import shutil
    import socket
    import subprocess
    import sys
    import tempfile

    tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]  # nothing listens here once the socket closes
        os.makedirs(os.path.join(tmp, "ray"))
        with open(os.path.join(tmp, "ray", "ray_current_cluster"), "w") as f:
            f.write(f"127.0.0.1:{dead}")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_TMPDIR"] = tmp
        code = ("import ray; from pipeline.core.ray_cluster import connect; gcs = connect(num_cpus=1); "
                "assert ray.get(ray.remote(lambda: 7).remote()) == 7; print('GCS', gcs); ray.shutdown()")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
        assert out.returncode == 0, out.stderr[-3000:]
        gcs = next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("GCS "))
        assert not gcs.endswith(f":{dead}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_prefect_server_health(prefect_server):
    with urllib.request.urlopen(f"{prefect_server}/health", timeout=5) as r:
        assert json.loads(r.read()) is True
    assert os.environ["PREFECT_API_URL"] == prefect_server


def test_storage_roundtrip_on_s3(s3_bucket, s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    uri = f"s3://{s3_bucket}/a/b.json"
    assert not storage.exists(uri)
    storage.write_json(uri, {"x": 1})
    assert storage.read_json(uri) == {"x": 1}
    assert storage.list_files(f"s3://{s3_bucket}/a", ".json") == [uri]
    storage.delete(f"s3://{s3_bucket}/a")
    assert not storage.exists(uri)


def test_storage_roundtrip_local(tmp_path):
    uri = str(tmp_path / "x" / "y.bin")
    storage.write_bytes(uri, b"abc")
    assert storage.read_bytes(uri) == b"abc"
    assert storage.list_files(str(tmp_path / "x")) == [uri]
    assert not [p for p in (tmp_path / "x").iterdir() if p.name.startswith(".")]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(str(tmp_path / "missing"))
