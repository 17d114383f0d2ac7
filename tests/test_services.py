"""The shared service fixtures start real services that answer."""
import json
import os
import urllib.request

import pytest

from pipeline import storage


@pytest.mark.slow
def test_ray_head_answers_with_dashboard(ray_address):
    import ray

    from pipeline import ray_cluster

    gcs = ray_cluster.connect(ray_address)
    assert gcs.rsplit(":", 1)[1] == ray_address.rsplit(":", 1)[1]  # Ray reports the node's own IP
    assert ray.get(ray.remote(lambda x: x * 2).remote(21)) == 42
    ray.shutdown()


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
