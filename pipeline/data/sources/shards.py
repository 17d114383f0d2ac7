"""Webdataset shards in img2dataset's layout, written by archive ingestion, plus what download and ingest share.

A shard folder holds, per shard id N (5 digits): `N.tar` (members `key.jpg`, `key.txt`, `key.json`), `N.parquet`
(one row per input sample, failures included: key, caption, status, error_message, sizes, extra columns) and
`N_stats.json` (img2dataset's per-shard stats). The stats file is written last, so its presence means the shard is
complete: a tar or parquet without one is an interrupted write and gets removed. This is exactly what img2dataset
writes, so the precompute step reads downloaded and ingested sources alike.
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.core import layout, storage
from pipeline.core.images import SkipReason, decode_image

REPORT = "_report.json"
STATS_SUFFIX = "_stats.json"
ENCODE_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}

# Failure reasons: img2dataset's free-text error messages (and ingest skips) bucketed into a few names.
_REASONS = (
    (re.compile(r"x-robots-tag", re.I), "opt_out"),
    (re.compile(r"too small", re.I), "too_small"),
    (re.compile(r"area too large|too large", re.I), "too_large"),
    (re.compile(r"aspect ratio", re.I), "aspect_ratio"),
    (re.compile(r"decod|cannot identify|corrupt|not.an.image|truncated|empty", re.I), "decode_error"),
    (re.compile(r"timed? ?out", re.I), "timeout"),
    (re.compile(r"hash mismatch", re.I), "hash_mismatch"),
    (re.compile(r"unknown url type|no host given|invalid url", re.I), "invalid_url"),
    (re.compile(r"refused|reset|remote end closed|urlopen error|name or service|ssl|eof occurred|"
                r"connection|network is unreachable|temporary failure", re.I), "connection_error"),
)
_HTTP = re.compile(r"HTTP Error (\d{3})", re.I)
# Worth a second attempt: the server may answer next time. Everything else (opt-out, 404, too small, ...) is final.
_RETRYABLE_HTTP = {408, 425, 429, 500, 502, 503, 504}


def failure_reason(message: str | None) -> str:
    """Bucket an img2dataset error message (or an ingest skip reason) into a short reason name."""
    if not message:
        return "unknown"
    if re.fullmatch(r"[a-z][a-z0-9_]*", message):  # already a reason name (ingest skips)
        return message
    m = _HTTP.search(message)
    if m:
        return f"http_{m.group(1)}"
    for pattern, reason in _REASONS:
        if pattern.search(message):
            return reason
    return "other"


def is_retryable(reason: str) -> bool:
    """Whether a failure with this reason may succeed on a later attempt."""
    if reason in ("timeout", "connection_error"):
        return True
    return reason.startswith("http_") and int(reason[5:]) in _RETRYABLE_HTTP


@dataclass
class IngestConfig:
    """Size policy and sharding for archives ingested without img2dataset (same policy as DownloadConfig)."""

    min_side: int = 256  # drop images whose short side is below this
    max_side: int = 512  # bring a longer short side down to this, keeping the aspect ratio
    max_aspect_ratio: float = float("inf")
    encode_format: str = "jpg"
    encode_quality: int = 95
    max_pixels: int = 64_000_000  # refuse decompression bombs before decoding
    processes: int = 1  # archives ingested in parallel

    def __post_init__(self):
        if not 1 <= self.min_side <= self.max_side:
            raise ValueError(f"expected 1 <= min_side <= max_side, got min_side={self.min_side}, "
                             f"max_side={self.max_side}")
        if self.encode_format not in ENCODE_FORMATS:
            raise ValueError(f"unknown encode_format {self.encode_format!r}; expected one of {list(ENCODE_FORMATS)}")
        if self.processes < 1:
            raise ValueError(f"processes must be >= 1, got {self.processes}")

    @classmethod
    def from_download(cls, cfg: Any, **overrides) -> "IngestConfig":
        """The ingest policy matching a DownloadConfig, so both paths produce the same images."""
        kw = {k: getattr(cfg, k) for k in ("min_side", "max_side", "encode_format", "encode_quality")}
        kw["max_aspect_ratio"] = cfg.max_aspect_ratio or float("inf")  # None: no limit
        return cls(**{**kw, **overrides})


@dataclass
class Encoded:
    """An image re-encoded under the size policy, or the reason it was dropped."""

    data: bytes | None
    reason: str | None = None
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None


def encode_image(data: bytes, policy: IngestConfig) -> Encoded:
    """Decode, apply the size policy (drop short side < min, shrink short side > max, keep aspect), re-encode."""
    d = decode_image(data, min_size=policy.min_side, max_pixels=policy.max_pixels)
    if d.image is None:
        reason = {SkipReason.TOO_SMALL: "too_small", SkipReason.TOO_LARGE: "too_large"}.get(d.reason, "decode_error")
        return Encoded(None, reason, original_width=d.width or None, original_height=d.height or None)
    im, (w, h) = d.image, d.image.size
    if max(w, h) / min(w, h) > policy.max_aspect_ratio:
        return Encoded(None, "aspect_ratio", original_width=w, original_height=h)
    if min(w, h) > policy.max_side:
        s = policy.max_side / min(w, h)
        size = (policy.max_side, max(1, round(h * s))) if w <= h else (max(1, round(w * s)), policy.max_side)
        im = im.resize(size, Image.BICUBIC, reducing_gap=3.0)
    buf = io.BytesIO()
    fmt = ENCODE_FORMATS[policy.encode_format]
    im.save(buf, fmt, **({"quality": policy.encode_quality} if fmt in ("JPEG", "WEBP") else {}))
    return Encoded(buf.getvalue(), None, im.size[0], im.size[1], w, h)


@dataclass
class RawSample:
    """One input image as an adapter reads it: bytes (None if missing, with a reason), caption, extra columns."""

    name: str
    data: bytes | None
    caption: str
    extra: dict[str, Any]
    reason: str | None = None


def shard_name(shard_id: int) -> str:
    """12 -> '00012' (img2dataset's 5-digit shard names)."""
    return f"{shard_id:05d}"


def shard_id_of(uri: str) -> int:
    """`.../00012_stats.json` or `.../00012.tar` -> 12."""
    return int(os.path.basename(uri).split("_")[0].split(".")[0])


def done_shards(folder: str) -> dict[int, str]:
    """Shard id -> stats URI for every complete shard in folder."""
    return {shard_id_of(u): u for u in storage.list_files(folder, STATS_SUFFIX)}


def remove_incomplete(folder: str) -> list[str]:
    """Delete tars/parquets without a stats file and unreadable stats files (interrupted writes); returns them."""
    removed = []
    if not storage.is_s3(folder) and os.path.isdir(folder):
        import shutil

        for entry in os.listdir(folder):  # shards assembled by a killed ingest
            if entry.startswith(".tmp-shard-"):
                shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)
    done = {}
    for uri in storage.list_files(folder, STATS_SUFFIX):
        try:
            storage.read_json(uri)
            done[shard_id_of(uri)] = uri
        except (ValueError, OSError):
            storage.delete(uri)
            removed.append(uri)
    for suffix in (".tar", ".parquet"):
        for uri in storage.list_files(folder, suffix):
            name = os.path.basename(uri)[: -len(suffix)]
            if name.isdigit() and int(name) not in done:
                storage.delete(uri)
                removed.append(uri)
    return removed


def put_file(local_path: str, uri: str) -> None:
    """Move a finished local file to a local path or s3:// URI (rename locally; streamed upload to S3)."""
    if storage.is_s3(uri):
        fs, path = storage.filesystem(uri)
        with open(local_path, "rb") as src, fs.open_output_stream(path) as dst:
            while chunk := src.read(8 << 20):
                dst.write(chunk)
        os.remove(local_path)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
        os.replace(local_path, uri)


def _local_tmp_dir(out_folder: str) -> str:
    """Where a shard is assembled: beside its target when local (so the final rename is atomic), else /tmp."""
    if storage.is_s3(out_folder):
        return tempfile.mkdtemp(prefix="microdit-shard-")
    os.makedirs(out_folder, exist_ok=True)
    return tempfile.mkdtemp(prefix=".tmp-shard-", dir=out_folder)


def write_shard(out_folder: str, shard_id: int, samples: Iterable[RawSample], policy: IngestConfig,
                source: str) -> dict:
    """Encode samples under the policy into shard `shard_id` (tar, parquet, stats last); returns the stats."""
    start = time.time()
    name = shard_name(shard_id)
    tmp = _local_tmp_dir(out_folder)
    tar_path, pq_path = os.path.join(tmp, name + ".tar"), os.path.join(tmp, name + ".parquet")
    rows: list[dict] = []
    status = Counter()
    ext = policy.encode_format
    try:
        with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
            for i, s in enumerate(samples):
                key = f"{name}{i:07d}"
                enc = encode_image(s.data, policy) if s.data is not None else Encoded(None, s.reason or "missing")
                meta = {"key": key, "caption": s.caption, "source_name": s.name,
                        "status": "success" if enc.data is not None else "failed_to_ingest",
                        "error_message": enc.reason, "width": enc.width, "height": enc.height,
                        "original_width": enc.original_width, "original_height": enc.original_height,
                        "extra": json.dumps(s.extra, sort_keys=True, default=str)}
                rows.append(meta)
                status[enc.reason or "success"] += 1
                if enc.data is None:
                    continue
                sample_json = {k: v for k, v in meta.items() if k != "extra"} | s.extra
                for suffix, payload in ((ext, enc.data), ("txt", s.caption.encode()),
                                        ("json", json.dumps(sample_json, default=str).encode())):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size, info.mtime = len(payload), 0
                    tar.addfile(info, io.BytesIO(payload))
        pq.write_table(pa.Table.from_pylist(rows, schema=META_SCHEMA), pq_path)
        successes = status["success"]
        stats = {"count": len(rows), "successes": successes, "failed_to_download": 0,
                 "failed_to_resize": len(rows) - successes, "duration": time.time() - start,
                 "start_time": start, "end_time": time.time(), "status_dict": dict(status), "source": source}
        put_file(tar_path, storage.join(out_folder, name + ".tar"))
        put_file(pq_path, storage.join(out_folder, name + ".parquet"))
        storage.write_json(storage.join(out_folder, name + STATS_SUFFIX), stats)  # commit marker, last
        return stats
    finally:
        for p in (tar_path, pq_path):
            if os.path.exists(p):
                os.remove(p)
        os.rmdir(tmp)


META_SCHEMA = pa.schema([
    ("key", pa.string()), ("caption", pa.string()), ("source_name", pa.string()), ("status", pa.string()),
    ("error_message", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("original_width", pa.int32()), ("original_height", pa.int32()), ("extra", pa.string()),
])


def read_shard_tar(uri: str) -> Iterator[dict[str, Any]]:
    """Samples of one webdataset tar as dicts {"__key__", ext: bytes, ...}, grouped by key (for tests and tools)."""
    sample: dict[str, Any] = {}
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(uri)), mode="r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, _, ext = m.name.partition(".")
            if sample and sample["__key__"] != key:
                yield sample
                sample = {}
            sample["__key__"] = key
            sample[ext] = tar.extractfile(m).read()
    if sample:
        yield sample


@dataclass
class ArchiveTask:
    """One input archive -> one output shard. `reader` is a module-level function so tasks pickle to workers."""

    shard_id: int
    name: str
    reader: Any  # Callable[[ArchiveTask], Iterator[RawSample]]
    params: dict


def _run_task(task: ArchiveTask, out_folder: str, policy: IngestConfig, source: str) -> dict:
    return write_shard(out_folder, task.shard_id, task.reader(task), policy, source)


def ingest(tasks: list[ArchiveTask], out_folder: str, policy: IngestConfig, source: str,
           extra_report: dict | None = None, finalize=None) -> dict:
    """Ingest archives into shards (one per archive), resumably; write _report.json then _SUCCESS; return report.

    A rerun skips complete shards; with _SUCCESS present it returns the stored report at once. `finalize(report)`
    runs after the shards and before the marker (for side outputs) and may return more report fields.
    """
    if layout.is_complete(out_folder):
        return storage.read_json(storage.join(out_folder, REPORT))
    if not tasks:
        raise FileNotFoundError(f"no input archives found for source {source!r}")
    start = time.time()
    remove_incomplete(out_folder)
    done = done_shards(out_folder)
    for t in tasks:  # a shard id must keep meaning the same archive across reruns
        if t.shard_id in done:
            prev = storage.read_json(done[t.shard_id]).get("source")
            if prev is not None and prev != f"{source}:{t.name}":
                raise ValueError(f"shard {t.shard_id} in {out_folder!r} came from {prev!r}, now {source}:{t.name}; "
                                 "the set of input archives changed: use a fresh output folder")
    todo = [t for t in tasks if t.shard_id not in done]
    if policy.processes > 1 and len(todo) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(policy.processes, len(todo)), mp_context=ctx) as ex:
            list(ex.map(_run_task, todo, [out_folder] * len(todo), [policy] * len(todo),
                        [f"{source}:{t.name}" for t in todo]))
    else:
        for t in todo:
            _run_task(t, out_folder, policy, f"{source}:{t.name}")
    report = summarize(out_folder)
    report.update({"source": source, "archives": len(tasks), "seconds": round(time.time() - start, 3)})
    report.update(extra_report or {})
    if finalize is not None:
        report.update(finalize(report) or {})
    storage.write_json(storage.join(out_folder, REPORT), report)
    layout.mark_complete(out_folder)
    return report


def summarize(folder: str) -> dict:
    """Counts over the complete shards of folder: images written, failures by reason, shards, bytes."""
    done = done_shards(folder)
    written, failures = 0, Counter()
    for sid in sorted(done):
        t = storage.read_parquet(storage.join(folder, shard_name(sid) + ".parquet"), ["status", "error_message"])
        for st, msg in zip(t["status"].to_pylist(), t["error_message"].to_pylist()):
            if st == "success":
                written += 1
            else:
                failures[failure_reason(msg)] += 1
    return {"images_written": written, "failed": sum(failures.values()),
            "failures_by_reason": dict(sorted(failures.items())), "shards": len(done),
            "bytes": tar_bytes(folder)}


def tar_bytes(folder: str) -> int:
    """Total size of the .tar files directly in folder."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(folder)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sum(i.size for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".tar"))
