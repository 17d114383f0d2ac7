"""The download step: real img2dataset runs against loopback HTTP servers over synthetic images."""
from __future__ import annotations

import http.server
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.core import storage
from pipeline.data.download import DownloadConfig, download, normalize_url_list, read_url_list
from pipeline.data.sources.shards import failure_reason, is_retryable, read_shard_tar
from pipeline.testing.synthetic import write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
MIN, MAX = 64, 72  # size policy for these tests (the recipe's is 256 / 512)


def small_cfg(**kw) -> DownloadConfig:
    base = dict(processes=1, threads=4, timeout=5, min_side=MIN, max_side=MAX, number_sample_per_shard=10,
                log_interval=1.0)
    return DownloadConfig(**{**base, **kw})


def expected(ds) -> dict:
    """What a correct download of the synthetic dataset keeps: url -> caption, and failures by reason."""
    kept, reasons = {}, Counter()
    for e in ds.entries:
        if e.kind == "missing":
            reasons["http_404"] += 1
        elif e.kind == "opt_out":
            reasons["opt_out"] += 1
        elif e.kind in ("corrupt", "not_an_image"):
            reasons["decode_error"] += 1
        elif min(e.width, e.height) < MIN:  # "tiny" and the small ok/cmyk/palette images
            reasons["too_small"] += 1
        else:
            kept[e.file] = e.caption
    return {"kept": kept, "reasons": dict(reasons)}


def shard_samples(out: str) -> list[dict]:
    """Every sample in the tars of out: key, url path, caption, json, image size."""
    rows = []
    for uri in storage.list_files(out, ".tar"):
        for s in read_shard_tar(uri):
            meta = json.loads(s["json"])
            rows.append({"key": s["__key__"], "file": urllib.parse.urlsplit(meta["url"]).path.lstrip("/"),
                         "caption": s["txt"].decode(), "meta": meta, "size": Image.open(io.BytesIO(s["jpg"])).size})
    return rows


@pytest.fixture
def synthetic(tmp_path):
    return write_synthetic_dataset(tmp_path / "syn", 30, size=64, seed=3, bad_fraction=0.3, opt_out_fraction=0.1)


class TestServer:
    """Loopback server over a folder: opt-out files carry X-Robots-Tag: noai, files in fail_once answer 503 on
    their first request, and every request can be slowed down."""

    def __init__(self, folder, opt_out=(), fail_once=(), delay: float = 0.0):
        self.opt_out, self.fail_once, self.failed, self.delay = set(opt_out), set(fail_once), set(), delay
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **k):
                super().__init__(*a, directory=str(folder), **k)

            def do_GET(self):
                path = urllib.parse.urlsplit(self.path).path.lstrip("/")
                outer.requests.append(path)
                if path in outer.fail_once and path not in outer.failed:
                    outer.failed.add(path)
                    self.send_error(503, "try again later")
                    return
                time.sleep(outer.delay)
                super().do_GET()

            def end_headers(self):
                if urllib.parse.urlsplit(self.path).path.lstrip("/") in outer.opt_out:
                    self.send_header("X-Robots-Tag", "noai")
                super().end_headers()

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


TestServer.__test__ = False  # a helper, not a test class


# --------------------------------------------------------------------------------------- fast unit tests

def test_url_list_formats_columns_and_dedupe(tmp_path):
    rows = {"image_url": ["http://h/a.jpg", "http://h/b.jpg", "http://h/a.jpg", None, " http://h/c.jpg "],
            "text": ["a", None, "dup", "no url", "c"], "source_id": [1, 2, 3, 4, 5]}
    csv, jsonl = tmp_path / "list.csv", tmp_path / "list.jsonl"
    pacsv.write_csv(pa.table(rows), csv)
    jsonl.write_text("\n".join(json.dumps(dict(zip(rows, r))) for r in zip(*rows.values())))
    cfg = DownloadConfig(url_col="image_url", caption_col="text")
    for path in (csv, jsonl):
        t, counts = normalize_url_list(read_url_list(str(path), "image_url", "text"), cfg)
        assert t["url"].to_pylist() == ["http://h/a.jpg", "http://h/b.jpg", "http://h/c.jpg"]
        assert t["caption"].to_pylist() == ["a", "", "c"] and t["source_id"].to_pylist() == [1, 2, 5]
        assert t["row_id"].to_pylist() == [0, 1, 2]
        assert counts == {"rows_in_list": 5, "missing_url": 1, "duplicate_urls": 1, "unique_urls": 3}

    with pytest.raises(ValueError, match=r"list.csv.*lacks column\(s\) \['url', 'caption'\].*image_url"):
        read_url_list(str(csv))
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"url": pa.array([], pa.string()), "caption": pa.array([], pa.string())}), empty)
    with pytest.raises(ValueError, match="empty.parquet.*empty.*columns found"):
        read_url_list(str(empty))
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        download(str(tmp_path / "nope.parquet"), str(tmp_path / "out"), DownloadConfig())
    (tmp_path / "list.xml").write_text("<urls/>")
    with pytest.raises(ValueError, match="list.xml.*unknown format"):
        read_url_list(str(tmp_path / "list.xml"))


def test_failure_reasons_bucket_img2dataset_messages():
    assert failure_reason("HTTP Error 404: Not Found") == "http_404"
    assert failure_reason("HTTP Error 503: Service Unavailable") == "http_503"
    assert failure_reason("Use of image disallowed by X-Robots-Tag directive") == "opt_out"
    assert failure_reason("image too small") == "too_small"
    assert failure_reason("Image decoding error") == "decode_error"
    assert failure_reason("<urlopen error timed out>") == "timeout"
    assert failure_reason("<urlopen error [Errno 111] Connection refused>") == "connection_error"
    assert is_retryable("http_503") and is_retryable("timeout") and not is_retryable("http_404")
    assert not is_retryable("opt_out") and not is_retryable("too_small")
    with pytest.raises(ValueError, match="min_side"):
        DownloadConfig(min_side=100, max_side=50)


# ---------------------------------------------------------------------------------- img2dataset runs

@pytest.mark.slow
def test_download_counts_failures_honours_opt_out_and_retries(tmp_path, synthetic):
    exp = expected(synthetic)
    assert exp["reasons"].get("opt_out") and exp["reasons"].get("http_404") and exp["reasons"].get("decode_error")
    flaky = sorted(exp["kept"])[:3]  # answer 503 once, then 200: recovered by the retry pass
    out = str(tmp_path / "shards")
    server = TestServer(synthetic.folder, opt_out=synthetic.opt_out_files, fail_once=flaky)
    try:
        rows = synthetic.rows(server.url)
        # A CSV list with other column names, an extra column, and a duplicate URL.
        table = pa.table({"image_url": [r["url"] for r in rows] + [rows[0]["url"]],
                          "text": [r["caption"] for r in rows] + ["duplicate"],
                          "origin": [f"syn-{i}" for i in range(len(rows) + 1)]})
        pacsv.write_csv(table, tmp_path / "urls.csv")
        cfg = small_cfg(url_col="image_url", caption_col="text", retries=0, retry_rounds=1)
        report = download(str(tmp_path / "urls.csv"), out, cfg)
    finally:
        server.close()

    got = shard_samples(out)
    assert {s["file"]: s["caption"] for s in got} == exp["kept"]  # opt-outs, 404s, bad and small images absent
    assert len({s["key"] for s in got}) == len(got) and len({s["file"] for s in got}) == len(got)
    assert report["images_written"] == len(exp["kept"]) and report["failures_by_reason"] == exp["reasons"]
    assert report["duplicate_urls"] == 1 and report["unique_urls"] == 30
    assert report["images_written"] + report["failed"] == report["unique_urls"]
    assert report["bytes"] > 0 and report["shards"] == 4 and report["main_shards"] == 3
    for s in got:  # size policy: short side kept in [MIN, MAX], aspect ratio kept
        e = next(e for e in synthetic.entries if e.file == s["file"])
        w, h = s["size"]
        assert MIN <= min(w, h) <= MAX
        assert abs(w / h - e.width / e.height) < 0.05
        assert s["meta"]["origin"].startswith("syn-")
    # Retry pass: the 503s were fetched again into an extra shard (keys rewritten to its id), 404s were not.
    assert server.failed == set(flaky)
    assert report["retried"] == 3 and report["recovered_by_retry"] == 3 and report["attempts"] == 33
    assert {s["key"][:5] for s in got if s["file"] in flaky} == {"00003"}
    assert json.loads(Path(out, "_report.json").read_text()) == report
    assert Path(out, "_SUCCESS").exists() and not Path(out, "_work").exists()
    # A rerun with _SUCCESS present returns the stored report without downloading (the server is gone).
    assert download(str(tmp_path / "urls.csv"), out, cfg) == report
    # Killed after the retry shard was committed but before _SUCCESS: a rerun neither retries nor duplicates.
    os.remove(os.path.join(out, "_SUCCESS"))
    again = download(str(tmp_path / "urls.csv"), out, cfg)
    assert again["images_written"] == report["images_written"] and again["attempts"] == 33
    assert len(shard_samples(out)) == len(got)


@pytest.mark.slow
def test_kill_and_resume_finishes_without_duplicates(tmp_path, synthetic):
    exp = expected(synthetic)
    out = str(tmp_path / "shards")
    server = TestServer(synthetic.folder, opt_out=synthetic.opt_out_files, delay=0.25)
    try:
        synthetic.write_url_list(str(tmp_path / "urls.parquet"), server.url)
        code = ("import sys; from pipeline.data.download import download, DownloadConfig; "
                f"download({str(tmp_path / 'urls.parquet')!r}, {out!r}, DownloadConfig(processes=1, threads=2, "
                f"timeout=5, min_side={MIN}, max_side={MAX}, number_sample_per_shard=5))")
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if len(storage.list_files(out, "_stats.json")) >= 2:
                break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group we started: driver, img2dataset and its pool
        proc.wait(timeout=30)
        done_at_kill = len(storage.list_files(out, "_stats.json"))
        assert 2 <= done_at_kill < 6 and not Path(out, "_SUCCESS").exists()

        report = download(str(tmp_path / "urls.parquet"), out, small_cfg(number_sample_per_shard=5))
    finally:
        server.close()
    got = shard_samples(out)
    assert sorted(s["file"] for s in got) == sorted(exp["kept"])  # same rows as a clean run
    assert len({s["key"] for s in got}) == len(got)
    assert report["images_written"] == len(exp["kept"]) and report["failures_by_reason"] == exp["reasons"]
    assert report["attempts"] == 30 and report["shards"] == 6


@pytest.mark.slow
def test_download_to_s3_with_local_staging(tmp_path, synthetic, s3_endpoint, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    exp = expected(synthetic)
    urls = f"s3://{s3_bucket}/data/urls/synthetic.parquet"
    out = f"s3://{s3_bucket}/data/shards/synthetic"
    cfg = small_cfg(staging_dir=str(tmp_path / "stage"))
    server = TestServer(synthetic.folder, opt_out=synthetic.opt_out_files)
    try:
        synthetic.write_url_list(urls, server.url)
        report = download(urls, out, cfg)
        assert report["images_written"] == len(exp["kept"]) and report["failures_by_reason"] == exp["reasons"]
        assert storage.exists(f"{out}/_SUCCESS") and storage.read_json(f"{out}/_report.json") == report
        names = [u.rsplit("/", 1)[1] for u in storage.list_files(out)]
        assert [n for n in names if n.endswith(".tar")] == ["00000.tar", "00001.tar", "00002.tar"]
        assert sum(n.endswith("_stats.json") for n in names) == 3
        assert {s["file"]: s["caption"] for s in shard_samples(out)} == exp["kept"]
        assert download(urls, out, cfg) == report  # _SUCCESS: the stored report

        # Resume on a fresh machine (no staging left) after an upload died before shard 1's stats file:
        # shard 1 is downloaded again, shards 0 and 2 are not, nothing is duplicated.
        assert not any(Path(tmp_path / "stage").iterdir())
        for name in ("_SUCCESS", "00001_stats.json"):
            storage.delete(f"{out}/{name}")
        before = {u: storage.read_bytes(u) for u in (f"{out}/00000.tar", f"{out}/00002.tar")}
        server.requests.clear()
        again = download(urls, out, cfg)
    finally:
        server.close()
    assert sorted(server.requests) == sorted(e.file for e in synthetic.entries[10:20])  # shard 1's rows only
    assert again["images_written"] == report["images_written"] and again["attempts"] == 30
    assert all(storage.read_bytes(u) == b for u, b in before.items())
    assert sorted(s["file"] for s in shard_samples(out)) == sorted(exp["kept"])
