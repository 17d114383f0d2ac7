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

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.core import storage
from pipeline.data.download import DownloadConfig, download, normalize_url_list, read_url_list
from pipeline.data.sources.shards import failure_reason, is_retryable, read_shard_tar
from pipeline.data.shapes import write_synthetic_dataset

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
        assert counts == {"rows_in_list": 5, "missing_url": 1, "duplicate_urls": 1, "unique_urls": 3,
                          "url_not_utf8_skipped": 0, "caption_not_utf8_replaced": 0, "extra_not_utf8_replaced": 0}

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


# ------------------------------------------------------------------ reliability: modes, bombs, deadlines, UTF-8

W, H = 70, 66  # inside [MIN, MAX]: stored without resizing, so stored pixels compare 1:1 with the source


def smooth_rgb(w: int = W, h: int = H) -> np.ndarray:
    """(H, W, 3) uint8 gradients: smooth, so JPEG's error stays small and any mishandled mode stands out."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    rgb = np.stack([40 + 180 * x / (w - 1), 30 + 190 * y / (h - 1), 200 - 120 * (x + y) / (w + h - 2)], -1)
    return np.rint(rgb).astype(np.uint8)


def on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255.0
    return np.rint(rgb * a + 255.0 * (1 - a)).astype(np.uint8)


def encode_bytes(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def mode_cases() -> dict[str, tuple[bytes, np.ndarray]]:
    """file name -> (encoded bytes, the upright RGB pixels a faithful decode gives), one per accepted mode."""
    import cv2

    rgb = smooth_rgb()
    gray = rgb[..., 1]
    alpha = np.linspace(0, 255, W).astype(np.uint8)[None, :].repeat(H, 0)  # transparent left, opaque right
    ramp16 = (np.arange(W * H).reshape(H, W) * 65535 // (W * H - 1)).astype(np.uint16)
    gray16 = np.rint(ramp16 / 257.0).astype(np.uint8)
    bits = (np.indices((H, W)).sum(0) // 8 % 2).astype(bool)
    pal = Image.fromarray(rgb).quantize(colors=64)
    pal_t = pal.copy()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; displayed upright = rgb
    rgba = np.dstack([rgb, alpha])
    c = {
        "rgb.png": (encode_bytes(Image.fromarray(rgb), "PNG"), rgb),
        "rgb.jpg": (encode_bytes(Image.fromarray(rgb), "JPEG", quality=95), rgb),  # YCbCr JPEG
        "progressive.jpg": (encode_bytes(Image.fromarray(rgb), "JPEG", quality=95, progressive=True), rgb),
        "exif_rotated.jpg": (encode_bytes(Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_90), "JPEG",
                                          quality=95, exif=exif.tobytes()), rgb),
        "cmyk.jpg": (encode_bytes(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95), rgb),
        "rgba.png": (encode_bytes(Image.fromarray(rgba, "RGBA"), "PNG"), on_white(rgb, alpha)),
        "l.png": (encode_bytes(Image.fromarray(gray, "L"), "PNG"), np.dstack([gray] * 3)),
        "la.png": (encode_bytes(Image.fromarray(np.dstack([gray, alpha]), "LA"), "PNG"),
                   on_white(np.dstack([gray] * 3), alpha)),
        "p.png": (encode_bytes(pal, "PNG"), np.asarray(pal.convert("RGB"))),
        "p_transparent.png": (encode_bytes(pal_t, "PNG", transparency=pal_t.getpixel((0, 0))),
                              np.where((np.asarray(pal_t) == pal_t.getpixel((0, 0)))[..., None], 255,
                                       np.asarray(pal_t.convert("RGB"))).astype(np.uint8)),
        "one_bit.png": (encode_bytes(Image.fromarray(bits), "PNG"), np.dstack([bits * np.uint8(255)] * 3)),
        "i16.png": (encode_bytes(Image.fromarray(ramp16), "PNG"), np.dstack([gray16] * 3)),
        "i32.tif": (encode_bytes(Image.fromarray(ramp16.astype(np.int32), "I"), "TIFF"), np.dstack([gray16] * 3)),
        "f32.tif": (encode_bytes(Image.fromarray(gray.astype(np.float32) / 255.0, "F"), "TIFF"),
                    np.dstack([gray] * 3)),
        "rgb16.png": (cv2.imencode(".png", (rgb[..., ::-1].astype(np.uint16) * 257))[1].tobytes(), rgb),
        "rgba16.png": (cv2.imencode(".png", np.dstack([rgb[..., ::-1], alpha]).astype(np.uint16) * 257)[1]
                       .tobytes(), on_white(rgb, alpha)),
        "rgba.webp": (encode_bytes(Image.fromarray(rgba, "RGBA"), "WEBP", lossless=True), on_white(rgb, alpha)),
        "rgb.webp": (encode_bytes(Image.fromarray(rgb), "WEBP", quality=95), rgb),
        "rgb.gif": (encode_bytes(pal, "GIF"), np.asarray(pal.convert("RGB"))),
        "rgb.bmp": (encode_bytes(Image.fromarray(rgb), "BMP"), rgb),
    }
    assert Image.open(io.BytesIO(c["i16.png"][0])).mode == "I;16"
    assert Image.open(io.BytesIO(c["cmyk.jpg"][0])).mode == "CMYK"
    return c


def assert_pixels_match(stored: bytes, want: np.ndarray, name: str) -> None:
    got = np.asarray(Image.open(io.BytesIO(stored)).convert("RGB")).astype(int)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    err = np.abs(got - want.astype(int))
    # JPEG q95 on smooth pixels (+ a lossy source for the JPEG/WEBP cases): small on average, bounded everywhere.
    assert err.mean() < 3.0 and np.percentile(err, 99) <= 16, (name, err.mean(), np.percentile(err, 99))


def write_csv_list(path: Path, rows: list[tuple[bytes, bytes]]) -> None:
    """A CSV URL list written as raw bytes, so a URL or caption can hold bytes that are not UTF-8."""
    path.write_bytes(b"url,caption\n" + b"".join(u + b"," + c + b"\n" for u, c in rows))


def valid_png(w: int, h: int) -> bytes:
    """A real (decodable) grayscale PNG of w x h that is tiny on disk: a valid decompression bomb."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    co = zlib.compressobj(1)
    idat = b"".join(co.compress(b"\0" * (w + 1)) for _ in range(h)) + co.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class TrickleServer:
    """Loopback server that answers every GET with a valid image, one byte every `interval` seconds, for at most
    `give_up` seconds; with `headers=True` it already trickles the response headers."""

    def __init__(self, body: bytes, interval: float = 0.2, give_up: float = 6.0, headers: bool = False):
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                head = (f"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n"
                        .encode())
                stream, start = (head + body) if headers else body, time.monotonic()
                if not headers:
                    self.wfile.write(head)
                    self.wfile.flush()
                try:
                    for i in range(len(stream)):
                        if time.monotonic() - start > give_up:
                            return
                        self.wfile.write(stream[i:i + 1])
                        self.wfile.flush()
                        time.sleep(interval)
                except OSError:  # the client hung up: what a deadline does
                    outer.hung_up += 1

            def log_message(self, *a):
                pass

        self.hung_up = 0
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_url_list_text_that_is_not_utf8_is_counted_not_fatal(tmp_path):
    from pipeline.data.sources import cc12m

    csv = tmp_path / "list.csv"
    write_csv_list(csv, [(b"http://h/a.jpg", b"fine"), (b"http://h/b.jpg", b"caf\xe9 cr\xe8me"),
                         (b"http://h/\xff.jpg", b"a URL that is not UTF-8")])
    binary = tmp_path / "binary.parquet"  # what a writer that kept raw bytes produces
    pq.write_table(pa.table({"url": ["http://h/a.jpg", "http://h/b.jpg"],
                             "caption": pa.array([b"fine", b"caf\xe9 cr\xe8me"], pa.binary()),
                             "note": pa.array([b"x\xff", b"y"], pa.binary())}), binary)
    invalid = tmp_path / "invalid.parquet"  # a string column holding invalid bytes (written unvalidated)
    pq.write_table(pa.table({"url": ["http://h/a.jpg", "http://h/b.jpg"],
                             "caption": pa.array([b"fine", b"caf\xe9 cr\xe8me"], pa.binary()).view(pa.string())}),
                   invalid)
    for path, extra in ((csv, 0), (binary, 1), (invalid, 0)):
        t, counts = normalize_url_list(read_url_list(str(path)), DownloadConfig())
        assert t["url"].to_pylist() == ["http://h/a.jpg", "http://h/b.jpg"], path
        assert t["caption"].to_pylist() == ["fine", "caf\ufffd cr\ufffdme"], path  # kept, bad bytes replaced
        assert counts["caption_not_utf8_replaced"] == 1 and counts["extra_not_utf8_replaced"] == extra, path
        assert counts["url_not_utf8_skipped"] == (1 if path == csv else 0) and counts["missing_url"] == 0, path
        assert counts["not_utf8_rows"] == ([1, 2] if path == csv else [0, 1] if extra else [1]), path
        pq.write_table(t, tmp_path / "normalized.parquet")  # what img2dataset reads: valid UTF-8 now
        pq.read_table(tmp_path / "normalized.parquet").validate(full=True)
    # The CC12M tsv reader: same rule (a line of Latin-1 no longer fails the whole file).
    tsv = tmp_path / "cc12m.tsv"
    tsv.write_bytes(b"http://h/a.jpg\tfine\nhttp://h/b.jpg\tcaf\xe9\nhttp://h/\xff.jpg\tbad url\n")
    report = cc12m.run(cc12m.CC12MConfig(str(tsv)), str(tmp_path / "cc12m.parquet"))
    assert report["rows"] == 2 and report["caption_not_utf8_replaced"] == 1 and report["url_not_utf8_skipped"] == 1
    assert pq.read_table(tmp_path / "cc12m.parquet")["caption"].to_pylist() == ["fine", "caf\ufffd"]


def test_fetch_has_a_total_deadline_for_trickling_servers():
    from pipeline.data.img2dataset_hooks import TRANSFER_TIMEOUT, fetch

    body = encode_bytes(Image.new("RGB", (8, 8), (200, 10, 10)), "PNG")
    for headers in (False, True):  # a trickled body, and trickled headers
        server = TrickleServer(body, interval=0.2, give_up=6.0, headers=headers)
        try:
            start = time.monotonic()
            key, stream, err = fetch((7, f"{server.url}/x.png"), timeout=5, total_timeout=1.0,
                                     user_agent_token=None, disallowed_header_directives=None)
            took = time.monotonic() - start
        finally:
            server.close()
        assert key == 7 and stream is None and err == TRANSFER_TIMEOUT, (headers, err)
        assert 0.9 <= took < 2.0, (headers, took)  # each read is < 5 s apart: only the total deadline fires
    assert failure_reason(TRANSFER_TIMEOUT) == "transfer_timeout" and not is_retryable("transfer_timeout")
    with pytest.raises(ValueError, match="total_timeout"):
        DownloadConfig(total_timeout=0)


def test_decoder_bounds_pixels_before_decoding_a_valid_bomb():
    import resource

    from pipeline.data.img2dataset_hooks import PolicyResizer
    from pipeline.data.sources.shards import IngestConfig

    bomb = valid_png(4000, 4000)  # 16 M pixels, a few KB on disk, decodable
    resize = PolicyResizer(IngestConfig(min_side=MIN, max_side=MAX, max_pixels=1_000_000))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    out = resize(io.BytesIO(bomb))
    assert out[0] is None and out[-1] == "too_large" and failure_reason(out[-1]) == "too_large"
    assert time.monotonic() - start < 0.5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 8 * 1024  # KiB: nothing decoded
    ok = resize(io.BytesIO(valid_png(900, 800)))  # under the limit: decoded and shrunk to the policy
    assert ok[-1] is None and (ok[1], ok[2], ok[3], ok[4]) == (81, MAX, 900, 800)


def test_resizer_keeps_every_accepted_mode_faithful():
    """The decoder img2dataset now uses, alone: every mode's output pixels equal the source's (fast; the slow
    test below checks the same through a real img2dataset run)."""
    from pipeline.data.img2dataset_hooks import PolicyResizer
    from pipeline.data.sources.shards import IngestConfig

    resize = PolicyResizer(IngestConfig(min_side=MIN, max_side=MAX))
    for name, (data, want) in mode_cases().items():
        out, w, h, ow, oh, err = resize(io.BytesIO(data))
        assert err is None and (w, h) == (ow, oh) == (W, H), (name, err, w, h, ow, oh)
        assert_pixels_match(out, want, name)


@pytest.mark.slow
def test_download_stores_every_image_mode_faithfully_and_skips_bombs(tmp_path):
    cases = mode_cases()
    folder = tmp_path / "files"
    folder.mkdir()
    for name, (data, _) in cases.items():
        (folder / name).write_bytes(data)
    (folder / "bomb.png").write_bytes(valid_png(1500, 1500))  # 2.25 M pixels > max_pixels below
    names = sorted(cases) + ["bomb.png"]
    server = TestServer(folder)
    try:
        rows = [(f"{server.url}/{n}".encode(), f"picture {n}".encode()) for n in names]
        rows[0] = (rows[0][0], b"caption in latin-1: caf\xe9")  # not UTF-8: kept, replaced, counted
        write_csv_list(tmp_path / "urls.csv", rows)
        report = download(str(tmp_path / "urls.csv"), str(tmp_path / "out"),
                          small_cfg(max_pixels=1_000_000, number_sample_per_shard=100))
    finally:
        server.close()
    assert report["failures_by_reason"] == {"too_large": 1}, report  # the bomb, counted; nothing else lost
    assert report["images_written"] == len(cases) and report["caption_not_utf8_replaced"] == 1
    stored = {}
    for uri in storage.list_files(str(tmp_path / "out"), ".tar"):
        for s in read_shard_tar(uri):
            meta = json.loads(s["json"])
            stored[urllib.parse.urlsplit(meta["url"]).path.lstrip("/")] = (s["jpg"], s["txt"].decode())
    assert stored[names[0]][1] == "caption in latin-1: caf\ufffd"
    for name, (_, want) in cases.items():  # every accepted mode: stored pixels = the source's, within JPEG error
        assert_pixels_match(stored[name][0], want, name)


@pytest.mark.slow
def test_download_fails_a_trickling_server_at_the_total_deadline(tmp_path):
    good = tmp_path / "files"
    good.mkdir()
    (good / "ok.png").write_bytes(encode_bytes(Image.fromarray(smooth_rgb()), "PNG"))
    trickle = TrickleServer(encode_bytes(Image.fromarray(smooth_rgb()), "PNG"), interval=0.2, give_up=8.0)
    server = TestServer(good)
    try:
        pq.write_table(pa.table({"url": [f"{server.url}/ok.png", f"{trickle.url}/slow.png"],
                                 "caption": ["fast", "slow"]}), tmp_path / "urls.parquet")
        start = time.monotonic()
        report = download(str(tmp_path / "urls.parquet"), str(tmp_path / "out"), small_cfg(total_timeout=1.0))
        took = time.monotonic() - start
    finally:
        server.close()
        trickle.close()
    assert report["images_written"] == 1 and report["failures_by_reason"] == {"transfer_timeout": 1}, report
    assert report["retried"] == 0  # a deadline is final, not retried
    assert trickle.hung_up == 1  # the client gave up on the transfer (without a deadline the server does, at 8 s)
    assert took < 60, took  # img2dataset's start-up dominates (10-20 s on 2 busy cores)
