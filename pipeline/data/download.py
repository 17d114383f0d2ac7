"""Download step: a URL list (parquet, csv or jsonl) -> img2dataset webdataset shards, resumable, with a report.

Layout of `out_uri` (local folder or s3://): img2dataset's `N.tar`, `N.parquet` (one row per URL, failures
included), `N_stats.json` (written last: the shard is complete), then `_report.json` and `_SUCCESS` (last).
`_work/` holds the step's own state; names starting with `_` are skipped by Ray Data's readers.

- Resume: img2dataset runs in incremental mode, so a rerun only downloads shards without a stats file; leftovers
  of a killed run (tar/parquet without stats) are removed first. The URL list is normalised (URLs deduplicated,
  a `row_id` column added) and fingerprinted; a rerun against a different list is refused.
- Retry pass: URLs whose every attempt failed for a reason that can change (timeout, connection error, HTTP
  408/429/5xx) are downloaded again into extra shards (ids after the main ones, keys rewritten to match), at most
  `retry_rounds` times. Success is decided per `row_id` over all shards, so nothing is counted or kept twice.
- S3: img2dataset writes through fsspec, and s3fs is not part of this stack, so for s3:// outputs it writes to a
  local staging folder and each finished shard is uploaded (tar, parquet, then stats); stats of shards already
  uploaded are copied back into staging so img2dataset skips them on a rerun from another machine.
- img2dataset runs in a child process: it installs signal handlers (main thread only), spawns its own pool and
  logger processes, and imports wandb; the child dies with its parent.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core import layout, storage
from pipeline.core.plan import DownloadConfig
from pipeline.core.progress import Reporter, Sink
from pipeline.data import img2dataset_child
from pipeline.data.sources.shards import (REPORT, STATS_SUFFIX, IngestConfig, done_shards, failure_reason,
                                          is_retryable, put_file, remove_incomplete, shard_name, tar_bytes)
from pipeline.data.sources.urls import is_text, utf8_column

log = logging.getLogger(__name__)

# Column names img2dataset reserves for its own metadata (plus ours): never passed as extra columns.
RESERVED = {"key", "caption", "url", "width", "height", "original_width", "original_height", "status",
            "error_message", "exif", "md5", "sha256", "sha512", "row_id"}


# ------------------------------------------------------------------------------------------------ URL list


def read_url_list(uri: str, url_col: str = "url", caption_col: str = "caption") -> pa.Table:
    """Read a parquet / csv / jsonl URL list (format from the extension); ValueError if columns or rows are missing."""
    fs, path = storage.filesystem(uri)
    if not storage.exists(uri):
        raise FileNotFoundError(f"URL list {uri!r} does not exist")
    name = path.lower()
    if name.endswith((".parquet", ".pq")):
        table = pq.read_table(path, filesystem=fs)
    elif name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz")):
        import pyarrow.csv as pacsv

        delimiter = "\t" if ".tsv" in name else ","
        with fs.open_input_stream(path, compression="detect") as f:
            table = pacsv.read_csv(f, parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True))
    elif name.endswith((".jsonl", ".jsonl.gz", ".json")):
        import pyarrow.json as pajson

        with fs.open_input_stream(path, compression="detect") as f:
            table = pajson.read_json(f)
    else:
        raise ValueError(f"URL list {uri!r}: unknown format; expected a .parquet, .csv, .tsv or .jsonl file")
    missing = [c for c in (url_col, caption_col) if c not in table.column_names]
    if missing:
        raise ValueError(f"URL list {uri!r} lacks column(s) {missing}; columns found: {table.column_names}")
    if table.num_rows == 0:
        raise ValueError(f"URL list {uri!r} is empty (columns found: {table.column_names})")
    return table


def normalize_url_list(table: pa.Table, cfg: DownloadConfig) -> tuple[pa.Table, dict]:
    """-> (url, caption, extras..., row_id) with empty URLs dropped and duplicate URLs kept once; and counts.

    Text that is not UTF-8 (CSV readers then infer a binary column; Parquet may carry it in a string column) does
    not fail the list: such a caption or extra value is kept with its bad bytes replaced by U+FFFD, such a URL is
    skipped (it names no fetchable address). Both are counted, with the first row numbers, in the report.
    """
    urls, bad_url = utf8_column(table[cfg.url_col])
    urls = pc.utf8_trim_whitespace(pc.if_else(pa.array(bad_url), None, urls))  # skipped: counted below
    captions, bad_caption = utf8_column(table[cfg.caption_col])
    captions = pc.fill_null(captions, "")
    if cfg.extra_columns is None:
        extras = [c for c in table.column_names if c not in (cfg.url_col, cfg.caption_col) and c not in RESERVED]
    else:
        bad = [c for c in cfg.extra_columns if c not in table.column_names or c in RESERVED]
        if bad:
            raise ValueError(f"extra_columns {bad} are missing from the URL list or reserved by img2dataset "
                             f"({sorted(RESERVED)}); columns found: {table.column_names}")
        extras = list(cfg.extra_columns)
    bad_extra = np.zeros(table.num_rows, bool)
    extra_cols = {}
    for c in extras:
        col = table[c]
        if is_text(col.type):
            col, bad = utf8_column(col)
            bad_extra |= bad
        extra_cols[c] = col
    t = pa.table({"url": urls, "caption": captions, **extra_cols})
    valid = pc.fill_null(pc.greater(pc.utf8_length(t["url"]), 0), False)
    n_raw = t.num_rows
    t = t.filter(valid)
    n_valid = t.num_rows
    # First occurrence of every URL, in list order.
    t = t.append_column("_i", pa.array(range(n_valid), pa.int64()))
    first = t.group_by("url", use_threads=False).aggregate([("_i", "min")])["_i_min"]
    t = t.take(np.sort(first.to_numpy())).drop_columns(["_i"])
    t = t.append_column("row_id", pa.array(range(t.num_rows), pa.int64()))
    n_bad_url = int(bad_url.sum())
    counts = {"rows_in_list": n_raw, "missing_url": n_raw - n_valid - n_bad_url, "url_not_utf8_skipped": n_bad_url,
              "caption_not_utf8_replaced": int(bad_caption.sum()), "extra_not_utf8_replaced": int(bad_extra.sum()),
              "duplicate_urls": n_valid - t.num_rows, "unique_urls": t.num_rows}
    bad_rows = np.flatnonzero(bad_url | bad_caption | bad_extra)
    if len(bad_rows):
        counts["not_utf8_rows"] = bad_rows[:10].tolist()  # 0-based data rows of the list, the first ten
        log.warning("URL list: %d row(s) with text that is not UTF-8 (rows %s...): URLs skipped, captions and "
                    "extra values kept with U+FFFD replacements", len(bad_rows), bad_rows[:10].tolist())
    return t, counts


def _fingerprint(t: pa.Table) -> str:
    """Hash of the list's content; hosts are left out so a list re-pointed at a moved server still resumes."""
    h = hashlib.sha256()
    for url, cap in zip(t["url"].to_pylist(), t["caption"].to_pylist()):
        parts = urllib.parse.urlsplit(url)
        h.update(f"{parts.path}?{parts.query}\0{cap}\n".encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- img2dataset

def _img2dataset_kwargs(cfg: DownloadConfig, url_parquet: str, out_folder: str, extras: list[str]) -> dict:
    return dict(
        url_list=url_parquet, output_folder=out_folder, input_format="parquet", url_col="url", caption_col="caption",
        save_additional_columns=extras + ["row_id"], output_format="webdataset", incremental_mode="incremental",
        image_size=cfg.max_side, resize_mode="keep_ratio", resize_only_if_bigger=True, min_image_size=cfg.min_side,
        max_aspect_ratio=cfg.max_aspect_ratio or float("inf"), encode_format=cfg.encode_format, encode_quality=cfg.encode_quality,
        processes_count=cfg.processes, thread_count=cfg.threads, timeout=cfg.timeout, retries=cfg.retries,
        number_sample_per_shard=cfg.number_sample_per_shard, max_shard_retry=cfg.max_shard_retry,
        distributor="multiprocessing", enable_wandb=False, compute_hash=cfg.compute_hash,
        extract_exif=cfg.extract_exif, user_agent_token=cfg.user_agent_token,
        # An empty list turns opt-out checks off (img2dataset's convention); the default honours them.
        disallowed_header_directives=list(cfg.disallowed_header_directives),
    )


def _hooks(cfg: DownloadConfig) -> dict:
    """What the child swaps into img2dataset: our decode + size policy (archive ingestion's) and the deadline."""
    policy = IngestConfig.from_download(cfg, max_pixels=cfg.max_pixels)
    return {"policy": dataclasses.asdict(policy), "total_timeout": cfg.total_timeout}  # inf travels as Infinity


class ShardProgress:
    """Download progress from the finished shards' stats files (each read once: a finished shard never changes)."""

    def __init__(self, reporter: Reporter | None, urls: int, n_shards: int):
        self.reporter, self.urls, self.n_shards = reporter, urls, n_shards
        self.stats: dict[str, dict] = {}

    def __call__(self, folder: str) -> None:
        if self.reporter is None:
            return
        done = done_shards(folder)
        for uri in done.values():
            if uri not in self.stats:
                self.stats[uri] = storage.read_json(uri)
        tried = sum(int(s.get("count", 0)) for s in self.stats.values())
        ok = sum(int(s.get("successes", 0)) for s in self.stats.values())
        self.reporter.update(min(tried, self.urls), images=ok, success=f"{ok / tried:.1%}" if tried else "-",
                             shards=f"{len(done)}/{self.n_shards}")


def _run_img2dataset(kwargs: dict, hooks: dict, log_path: str, n_shards: int, what: str, interval: float,
                     progress: ShardProgress | None = None) -> None:
    """Run img2dataset in a child process, logging shard progress; RuntimeError (with its log tail) on failure."""
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled", WANDB_SILENT="true",
               PYTHONUNBUFFERED="1")
    folder = kwargs["output_folder"]
    with open(log_path, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", img2dataset_child.__name__, json.dumps(kwargs),
                                 json.dumps(hooks)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
        last = time.monotonic()
        try:
            while proc.poll() is None:
                time.sleep(0.2)
                if time.monotonic() - last >= interval:
                    log.info("%s: %d/%d shards done", what, len(done_shards(folder)), n_shards)
                    if progress is not None and what == "download":  # retries re-count URLs: main pass only
                        progress(folder)
                    last = time.monotonic()
        finally:
            if proc.poll() is None:  # interrupted ourselves: do not leave img2dataset running
                proc.terminate()
                proc.wait()
    if proc.returncode != 0:
        with open(log_path, "rb") as f:
            tail = f.read()[-3000:].decode(errors="replace")
        raise RuntimeError(f"img2dataset exited with {proc.returncode} for {what}; log {log_path}:\n{tail}")
    log.info("%s: %d/%d shards done", what, len(done_shards(folder)), n_shards)


# -------------------------------------------------------------------------------------------- the step

def download(url_list_uri: str, out_uri: str, cfg: DownloadConfig | None = None, progress: Sink | None = None,
             step: str = "download") -> dict:
    """Download a URL list into webdataset shards at out_uri; returns the report (stored one if _SUCCESS exists).

    progress: where records of URLs done (images written, success rate, shards) go while it runs, as `step`."""
    cfg = cfg or DownloadConfig()
    if layout.is_complete(out_uri):
        return storage.read_json(storage.join(out_uri, REPORT))
    start = time.time()
    table, counts = normalize_url_list(read_url_list(url_list_uri, cfg.url_col, cfg.caption_col), cfg)
    if table.num_rows == 0:
        raise ValueError(f"URL list {url_list_uri!r} has no non-empty URL in column {cfg.url_col!r}")
    extras = [c for c in table.column_names if c not in ("url", "caption", "row_id")]
    n_main = math.ceil(table.num_rows / cfg.number_sample_per_shard)
    shard_progress = ShardProgress(Reporter(step, "urls", progress, total=table.num_rows) if progress else None,
                                   table.num_rows, n_main)

    s3 = storage.is_s3(out_uri)
    work = _staging_dir(out_uri, cfg)
    os.makedirs(work, exist_ok=True)
    _check_same_list(out_uri, table, cfg)
    url_parquet = os.path.join(work, "urls.parquet")
    pq.write_table(table, url_parquet + ".tmp")
    os.replace(url_parquet + ".tmp", url_parquet)
    storage.delete(storage.join(out_uri, REPORT))  # img2dataset reads every *.json beside its shards as stats

    # Main pass.
    main_dir = os.path.join(work, "main") if s3 else out_uri
    remove_incomplete(out_uri)
    if s3:
        remove_incomplete(main_dir)
        _seed_stats(out_uri, main_dir)
    if not set(range(n_main)) <= set(done_shards(main_dir)):
        kwargs = _img2dataset_kwargs(cfg, url_parquet, main_dir, extras)
        _run_img2dataset(kwargs, _hooks(cfg), os.path.join(work, "img2dataset.log"), n_main, "download",
                         cfg.log_interval, shard_progress)
    if s3:
        _upload_finished(main_dir, out_uri)
    missing = sorted(set(range(n_main)) - set(done_shards(out_uri)))
    if missing:
        raise RuntimeError(f"{len(missing)} of {n_main} shards did not finish (ids {missing[:10]}...); "
                           f"see {work}/img2dataset.log and rerun to finish them")

    # Retry pass over failures that may succeed now.
    for round_ in range(cfg.retry_rounds):
        todo = _retry_candidates(out_uri, 1 + cfg.retry_rounds)
        if not todo:
            break
        log.info("retry round %d: %d URLs", round_ + 1, len(todo))
        _retry(table.take(pa.array(sorted(todo), pa.int64())), out_uri, work, cfg, extras, n_main)

    report = _report(out_uri, counts)
    report.update({"url_list": url_list_uri, "out_uri": out_uri, "main_shards": n_main,
                   "seconds": round(time.time() - start, 3), "config": _json_safe(_as_dict(cfg))})
    storage.write_json(storage.join(out_uri, REPORT), report)
    layout.mark_complete(out_uri)  # last: the output is complete
    if shard_progress.reporter is not None:  # the end: figures of the whole step, retries included
        shard_progress.reporter.finish(table.num_rows, images=report["images_written"], failed=report["failed"],
                                       success=f"{report['images_written'] / max(table.num_rows, 1):.1%}",
                                       shards=report["shards"], **{f"failed {k}": v for k, v in
                                                                   report["failures_by_reason"].items()})
    shutil.rmtree(work, ignore_errors=True)
    log.info("download done: %d images, %d failed %s", report["images_written"], report["failed"],
             report["failures_by_reason"])
    return report


def _as_dict(cfg: DownloadConfig) -> dict:
    return cfg.model_dump(mode="json")


def _json_safe(d: dict) -> dict:
    """inf -> "inf", so the report is strict JSON."""
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _staging_dir(out_uri: str, cfg: DownloadConfig) -> str:
    if not storage.is_s3(out_uri):
        return os.path.join(os.path.abspath(out_uri), "_work")
    tag = hashlib.sha256(out_uri.encode()).hexdigest()[:16]
    return os.path.join(cfg.staging_dir or tempfile.gettempdir(), f"microdit-download-{tag}")


def _check_same_list(out_uri: str, table: pa.Table, cfg: DownloadConfig) -> None:
    """Record the list's fingerprint on the first run; refuse to resume with another list or shard size."""
    state_uri = storage.join(out_uri, "_work", "input.json")
    state = {"fingerprint": _fingerprint(table), "rows": table.num_rows,
             "number_sample_per_shard": cfg.number_sample_per_shard}
    if storage.exists(state_uri):
        prev = storage.read_json(state_uri)
        if prev != state:
            raise ValueError(f"{out_uri!r} holds a partial download of another URL list or shard size "
                             f"({prev} != {state}); delete it or choose another output")
    else:
        storage.write_json(state_uri, state)


def _seed_stats(out_uri: str, staging: str) -> None:
    """Copy stats of shards already uploaded into staging, so incremental img2dataset skips them."""
    os.makedirs(staging, exist_ok=True)
    for sid, uri in done_shards(out_uri).items():
        local = os.path.join(staging, shard_name(sid) + STATS_SUFFIX)
        if not os.path.exists(local):
            storage.write_bytes(local, storage.read_bytes(uri))


def _upload_finished(staging: str, out_uri: str) -> None:
    """Upload staged shards that are complete locally but not yet in out_uri: tar, parquet, then stats."""
    uploaded = done_shards(out_uri)
    for sid, stats in sorted(done_shards(staging).items()):
        if sid in uploaded:
            continue
        name = shard_name(sid)
        for ext in (".tar", ".parquet"):
            put_file(os.path.join(staging, name + ext), storage.join(out_uri, name + ext))
        storage.write_bytes(storage.join(out_uri, name + STATS_SUFFIX), storage.read_bytes(stats))


def _attempts(out_uri: str) -> pa.Table:
    """All attempt rows (row_id, status, error_message) over the complete shards of out_uri."""
    parts = []
    for sid in sorted(done_shards(out_uri)):
        parts.append(storage.read_parquet(storage.join(out_uri, shard_name(sid) + ".parquet"),
                                          ["row_id", "status", "error_message"]))
    schema = pa.schema([("row_id", pa.int64()), ("status", pa.string()), ("error_message", pa.string())])
    return pa.concat_tables([p.cast(schema) for p in parts]) if parts else schema.empty_table()


def _final_states(out_uri: str) -> dict[int, tuple[bool, str | None, int]]:
    """row_id -> (succeeded in any attempt, reason of the last failure, number of attempts)."""
    t = _attempts(out_uri)
    states: dict[int, tuple[bool, str | None, int]] = {}
    for rid, st, msg in zip(t["row_id"].to_pylist(), t["status"].to_pylist(), t["error_message"].to_pylist()):
        ok, reason, n = states.get(rid, (False, None, 0))
        states[rid] = (ok or st == "success", None if st == "success" else failure_reason(msg), n + 1)
    return states


def _retry_candidates(out_uri: str, max_attempts: int) -> list[int]:
    return [rid for rid, (ok, reason, n) in _final_states(out_uri).items()
            if not ok and reason is not None and is_retryable(reason) and n < max_attempts]


def _retry(rows: pa.Table, out_uri: str, work: str, cfg: DownloadConfig, extras: list[str], n_main: int) -> None:
    """Download `rows` again in a staging folder, then commit its finished shards as new shards of out_uri."""
    ids = rows["row_id"].to_pylist()
    tag = hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:12]
    for entry in os.listdir(work):  # staging of an older retry list (its results may be committed already)
        if entry.startswith("retry-") and entry != f"retry-{tag}":
            shutil.rmtree(os.path.join(work, entry), ignore_errors=True)
    rdir = os.path.join(work, f"retry-{tag}")
    os.makedirs(rdir, exist_ok=True)
    urls = os.path.join(rdir, "urls.parquet")
    pq.write_table(rows, urls)
    staged = os.path.join(rdir, "out")
    remove_incomplete(staged)
    n = math.ceil(rows.num_rows / cfg.number_sample_per_shard)
    _run_img2dataset(_img2dataset_kwargs(cfg, urls, staged, extras), _hooks(cfg),
                     os.path.join(rdir, "img2dataset.log"), n, "retry", cfg.log_interval)
    oom = math.ceil(math.log10(cfg.number_sample_per_shard))
    for sid in sorted(done_shards(staged)):
        new_id = max([n_main - 1, *done_shards(out_uri)]) + 1
        _commit_rekeyed(staged, sid, out_uri, new_id, oom)
    shutil.rmtree(rdir, ignore_errors=True)


def _commit_rekeyed(staged: str, sid: int, out_uri: str, new_id: int, oom_sample: int) -> None:
    """Copy staged shard `sid` into out_uri as shard `new_id`, rewriting keys so they stay unique."""
    def rekey(key: str) -> str:
        return f"{10 ** oom_sample * new_id + int(key) % 10 ** oom_sample:0{oom_sample + 5}d}"

    src, dst = os.path.join(staged, shard_name(sid)), storage.join(out_uri, shard_name(new_id))
    buf = io.BytesIO()
    with tarfile.open(src + ".tar", "r:") as tin, tarfile.open(fileobj=buf, mode="w") as tout:
        for m in tin:
            data = tin.extractfile(m).read() if m.isfile() else b""
            key, _, ext = m.name.partition(".")
            if ext == "json":
                meta = json.loads(data)
                meta["key"] = rekey(key)
                data = json.dumps(meta, indent=4).encode()
            info = tarfile.TarInfo(f"{rekey(key)}.{ext}")
            info.size, info.mtime = len(data), m.mtime
            tout.addfile(info, io.BytesIO(data))
    meta = pq.read_table(src + ".parquet")
    keys = pa.array([rekey(k) for k in meta["key"].to_pylist()], pa.string())
    meta = meta.set_column(meta.schema.get_field_index("key"), "key", keys)
    with open(src + STATS_SUFFIX, encoding="utf-8") as f:
        stats = json.load(f)
    stats["retry_of_staged_shard"] = sid
    storage.write_bytes(dst + ".tar", buf.getvalue())
    storage.write_parquet(dst + ".parquet", meta)
    storage.write_json(dst + STATS_SUFFIX, stats)  # last: the shard is complete


def _report(out_uri: str, counts: dict) -> dict:
    states = _final_states(out_uri)
    retried = [rid for rid, (_, _, n) in states.items() if n > 1]
    written = sum(ok for ok, _, _ in states.values())
    failures = Counter(reason for ok, reason, _ in states.values() if not ok)
    unrecorded = counts["unique_urls"] - len(states)  # img2dataset drops a row only on an internal error
    if unrecorded:
        failures["unrecorded"] += unrecorded
    return {**counts, "images_written": written, "failed": sum(failures.values()),
            "failures_by_reason": dict(sorted(failures.items())), "attempts": sum(n for _, _, n in states.values()),
            "retried": len(retried), "recovered_by_retry": sum(states[r][0] for r in retried),
            "shards": len(done_shards(out_uri)), "bytes": tar_bytes(out_uri)}
