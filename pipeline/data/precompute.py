"""Precompute step: webdataset shards -> Parquet of VAE latents per resolution and caption token states, on Ray.

Design (why it is resumable and never duplicates under Ray Data's parallel, unordered execution):
- The unit of commit is an input shard: `{shards}/00042.tar` becomes exactly `{out}/part-00042.parquet`, written
  once, atomically (local: temp file + rename; S3: one PUT), with the shard's counts in its Parquet footer. A part
  that exists is complete; a rerun skips its shard and reads its counts back from the footer.
- Inside a shard the work streams per row, so a 10,000-image shard never has to sit in one object: Ray Data reads
  shards (tasks), decodes and crops images (CPU tasks), encodes latents, captions and, with `repa` set, DINOv2
  features (actor pools, on GPUs when the cluster has them), and spools encoded rows to
  `{out}/_spool/<shard>/<uuid>.parquet` (tasks). Spools are
  invisible to readers (`_` prefix) and are only ever read through the summaries the driver received, so a
  retried task's orphan spool is never read twice.
- Every row, skipped or not, reaches the spool writer, and each shard ends with one end row carrying its sample
  count. When the driver has seen as many rows as that count, the shard is complete: a Ray task merges its spools
  in key order into the part file and deletes them. A crash leaves only spools, cleared by the next run.
- `_report.json` then `_SUCCESS` are written last; a rerun after `_SUCCESS` returns the stored report.
- Shards are read by our own tar reader, not `ray.data.read_webdataset`: the commit needs each shard's sample
  count, pipeline.core.images needs the raw bytes to give typed skip reasons, and a truncated archive must cost its
  tail, not fail the whole dataset.
Bad input never stops the run: undecodable, too small or too large images, samples without an image and duplicate
keys are counted skips; CMYK/palette/16-bit/alpha images (converted), non-UTF-8 captions (decoded with
replacement), over-long captions (full text kept, `caption_truncated`), empty captions (kept as "" by default, or
skipped with `empty_captions="skip"`), resolutions above an image's short side (null latents, `has_<R>` False)
and truncated tar archives (the samples before the cut are kept, the error is reported) are counted handled cases.
One run at a time per output folder.
"""
from __future__ import annotations

import json
import logging
import posixpath
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from model.encoders import load_text_encoder, load_vae
from model.encoders.specs import is_llama_spec
from model.encoders.dino import feature_shape
from pipeline.core import layout, schema, storage
from pipeline.core import ray_cluster
from pipeline.core.plan import PrecomputeConfig
from pipeline.core.progress import Reporter, Sink
from pipeline.data.precompute_stages import (SPOOL_DIR, DecodeImages, EncodeCaptions, EncodeImages, EncodeRepa,
                                             ReadShard, SpoolWriter)

log = logging.getLogger(__name__)

STATS_KEY = b"microdit.precompute"
# Settings that change the rows written; a resumed run must match the parts already there.
CONTENT_FIELDS = ("resolutions", "vae", "text_encoder", "source", "max_caption_tokens", "seed", "min_side",
                  "max_pixels", "empty_captions")


def content_fingerprint(cfg: PrecomputeConfig, source: str) -> dict:
    """The settings that decide row content (a resumed run must match them)."""
    out = {k: getattr(cfg, k) for k in CONTENT_FIELDS}
    out["source"] = source
    if cfg.repa is not None:  # only when set: outputs made before REPA features existed keep their fingerprint
        out["repa"] = cfg.repa
    if is_llama_spec(cfg.text_encoder):  # Llama's states depend on the mode; older (compact) outputs had none
        out["text_mode"] = text_mode(cfg)
    return out


def text_mode(cfg: PrecomputeConfig) -> str:
    return cfg.text_mode or "release"


def list_shards(shards_uri: str, require_complete: bool = True) -> dict[str, str]:
    """{shard name: tar URI} of a webdataset folder."""
    if require_complete and not layout.is_complete(shards_uri):
        raise FileNotFoundError(f"shard folder {shards_uri!r} has no {layout.MARKER} marker: the download step has not "
                                "finished (set require_complete_input=False for a folder made otherwise)")
    tars = storage.list_files(shards_uri, ".tar")
    if not tars:
        raise FileNotFoundError(f"no .tar shards in {shards_uri!r}; expected img2dataset webdataset output")
    return {posixpath.basename(t)[:-len(".tar")]: t for t in tars}


def part_uri(out_uri: str, shard: str) -> str:
    return storage.join(out_uri, f"part-{shard}.parquet")


def encoder_dims(cfg: PrecomputeConfig) -> dict:
    """Latent channels, downsample and text shape of the configured encoders (loaded once on CPU to ask); for a
    text encoder with a fixed pad row (Llama) also that row and the empty prompt's embedding (`text_pad`,
    `unconditional`, float32 arrays)."""
    vae = load_vae(cfg.vae)
    text = load_text_encoder(cfg.text_encoder, tokens=cfg.max_caption_tokens, mode=text_mode(cfg))
    if text.context_length != cfg.max_caption_tokens:
        raise ValueError(f"text encoder {cfg.text_encoder!r} has context length {text.context_length}, "
                         f"expected max_caption_tokens={cfg.max_caption_tokens}")
    dims = {"latent_channels": vae.latent_channels, "downsample": vae.downsample,
            "text_tokens": text.context_length, "text_width": text.width}
    if getattr(text, "mode", None) == "compact":  # compact caption storage: only a caption's own rows are written
        dims["text_pad"] = text.pad_state.cpu().numpy()
    if hasattr(text, "unconditional"):  # the empty prompt's states: the unconditional input of training and CFG
        dims["unconditional"] = text.unconditional().cpu().numpy()
    if cfg.repa is not None:  # from the encoder's configs; its weights load in the actors only

        dims["repa_shape"] = feature_shape(cfg.repa)
    return dims


def output_schema(cfg: PrecomputeConfig, dims: dict | None = None) -> pa.Schema:
    """The part files' Parquet schema for the configured encoders and resolutions."""
    dims = dims or encoder_dims(cfg)
    return schema.latent_schema(cfg.resolutions, dims["latent_channels"], dims["downsample"], dims["text_tokens"],
                                dims["text_width"], dims.get("text_pad"), dims.get("repa_shape"))


def write_unconditional(out_uri: str, dims: dict) -> str | None:
    """`_unconditional.safetensors` beside the parts, when the text encoder defines an unconditional input."""
    if "unconditional" not in dims:
        return None
    return schema.write_unconditional(out_uri, dims["unconditional"], dims.get("text_pad"))


def read_part_stats(uri: str) -> dict:
    """The per-shard counts stored in a part file's footer."""
    fs, path = storage.filesystem(uri)
    try:
        meta = pq.read_schema(path, filesystem=fs).metadata or {}
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"part file {uri!r} ({fs.get_file_info(path).size} bytes) is not a readable Parquet "
                         f"file (truncated or damaged): {e}; delete it and rerun to re-encode its shard") from None
    if STATS_KEY not in meta:
        raise ValueError(f"{uri!r} has no {STATS_KEY.decode()} footer; not a precompute part file")
    return json.loads(meta[STATS_KEY])


def commit_shard(out_uri: str, stats: dict, spools: list[str], out_schema: pa.Schema, row_group_rows: int) -> dict:
    """Merge a complete shard's spools (key order) into its part file, atomically; then delete the spools."""
    tables = [pq.read_table(pa.BufferReader(storage.read_bytes(s))) for s in spools]
    table = pa.concat_tables(tables) if tables else out_schema.empty_table()
    table = table.sort_by("key")
    if len(set(table.column("key").to_pylist())) != table.num_rows or table.num_rows != stats["rows"]:
        raise RuntimeError(f"shard {stats['shard']!r}: spools hold {table.num_rows} rows, expected "
                           f"{stats['rows']} distinct keys")
    meta = dict(out_schema.metadata or {})
    meta[STATS_KEY] = json.dumps(stats, sort_keys=True).encode()
    storage.write_parquet(part_uri(out_uri, stats["shard"]), table.cast(out_schema).replace_schema_metadata(meta),
                          row_group_size=row_group_rows, **schema.parquet_options(out_schema))
    for s in spools:
        storage.delete(s)
    return stats


def _on_shard_committed(stats: dict) -> None:
    """Called on the driver after each part file is committed (progress log)."""
    log.info("committed part-%s.parquet: %d rows, skipped %s", stats["shard"], stats["rows"], stats["skipped"])


class _ShardTracker:
    """Driver-side tally of spool summaries; says when a shard has all its rows spooled."""

    def __init__(self, fingerprint: dict, uris: dict[str, str]):
        self.fingerprint, self.uris = fingerprint, uris
        self.seen, self.written, self.total = Counter(), Counter(), {}
        self.error, self.spools = {}, {n: [] for n in uris}
        self.skipped = {n: Counter() for n in uris}
        self.handled = {n: Counter() for n in uris}

    def add(self, s: dict) -> dict | None:
        """Record one summary row; the shard's stats when it became complete, else None."""
        name = str(s["shard"])
        self.seen[name] += int(s["rows"])
        self.written[name] += int(s["written"])
        self.skipped[name].update(json.loads(s["skipped"]))
        self.handled[name].update(json.loads(s["handled"]))
        if s["spool"]:
            self.spools[name].append(str(s["spool"]))
        if int(s["total"]) >= 0:
            self.total[name], self.error[name] = int(s["total"]), str(s["error"])
        if name in self.total and self.seen[name] > self.total[name]:
            raise RuntimeError(f"shard {name!r}: {self.seen[name]} rows seen, more than its {self.total[name]}")
        if self.total.get(name) != self.seen[name]:
            return None
        assert self.written[name] + sum(self.skipped[name].values()) == self.total[name]
        return {"shard": name, "shard_uri": self.uris[name], "samples": self.total[name],
                "rows": self.written[name], "skipped": dict(self.skipped[name]),
                "handled": dict(self.handled[name]), "error": self.error[name], "fingerprint": self.fingerprint}


def build_dataset(pending: dict[str, str], out_uri: str, cfg: PrecomputeConfig, source: str,
                  out_schema: pa.Schema, device: str, dtype: str):
    """The Ray Data pipeline from shard URIs to per-shard spool summaries."""
    import ray
    from ray.data import ActorPoolStrategy

    gpu = device == "cuda"
    placed = {"resources": dict(cfg.resources)} if cfg.resources else {}  # e.g. only on worker nodes
    items = [{"shard": name, "uri": uri} for name, uri in pending.items()]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(ReadShard(cfg.read_batch_rows), batch_size=1, num_cpus=1, **placed)
    ds = ds.map_batches(DecodeImages(cfg.resolutions, cfg.min_side, cfg.max_pixels, cfg.empty_captions),
                        batch_size=cfg.decode_batch_rows, num_cpus=1, **placed)
    if cfg.repa is not None:  # before EncodeImages, which drops the pixels
        ds = ds.map_batches(EncodeRepa, batch_size=cfg.repa_batch_size * 2,
                            compute=ActorPoolStrategy(size=cfg.repa_actors),
                            fn_constructor_kwargs=dict(repa_spec=cfg.repa, resolutions=cfg.resolutions,
                                                       batch_size=cfg.repa_batch_size, device=device, dtype=dtype),
                            num_cpus=cfg.cpus_per_actor, num_gpus=cfg.repa_gpus_per_actor if gpu else 0, **placed)
    ds = ds.map_batches(EncodeImages, batch_size=cfg.vae_batch_size * 2, compute=ActorPoolStrategy(size=cfg.vae_actors),
                        fn_constructor_kwargs=dict(vae_spec=cfg.vae, resolutions=cfg.resolutions,
                                                   batch_size=cfg.vae_batch_size, device=device, dtype=dtype,
                                                   seed=cfg.seed),
                        num_cpus=cfg.cpus_per_actor, num_gpus=cfg.vae_gpus_per_actor if gpu else 0, **placed)
    ds = ds.map_batches(EncodeCaptions, batch_size=cfg.text_batch_size, compute=ActorPoolStrategy(size=cfg.text_actors),
                        fn_constructor_kwargs=dict(text_spec=cfg.text_encoder, batch_size=cfg.text_batch_size,
                                                   device=device, dtype=dtype, max_tokens=cfg.max_caption_tokens,
                                                   mode=text_mode(cfg)),
                        num_cpus=cfg.cpus_per_actor, num_gpus=cfg.text_gpus_per_actor if gpu else 0, **placed)
    return ds.map_batches(SpoolWriter(out_uri, source, cfg.resolutions, out_schema), batch_size=cfg.spool_rows,
                          num_cpus=1, **placed)


def precompute_locally(shards: dict[str, str], out_uri: str, cfg: PrecomputeConfig, source: str) -> dict[str, dict]:
    """{shard name: stats}: the same stages, tally and commit as precompute(), in this process without Ray, on CPU.

    For tests and the benchmark's baseline; no _report.json or _SUCCESS is written.
    """
    dims = encoder_dims(cfg)
    out_schema = output_schema(cfg, dims)
    write_unconditional(out_uri, dims)
    read = ReadShard(cfg.read_batch_rows)
    decode = DecodeImages(cfg.resolutions, cfg.min_side, cfg.max_pixels, cfg.empty_captions)
    vae = EncodeImages(cfg.vae, cfg.resolutions, cfg.vae_batch_size, "cpu", "float32", cfg.seed)
    text = EncodeCaptions(cfg.text_encoder, cfg.text_batch_size, "cpu", "float32", cfg.max_caption_tokens,
                          text_mode(cfg))
    repa = EncodeRepa(cfg.repa, cfg.resolutions, cfg.repa_batch_size, "cpu", "float32") if cfg.repa else (lambda b: b)
    write = SpoolWriter(out_uri, source, cfg.resolutions, out_schema)
    tracker = _ShardTracker(content_fingerprint(cfg, source), shards)
    done = {}
    for name, uri in shards.items():
        for batch in read({"uri": np.array([uri], object), "shard": np.array([name], object)}):
            summary = write(text(vae(repa(decode(batch)))))
            for i in range(len(summary["shard"])):
                stats = tracker.add({k: v[i] for k, v in summary.items()})
                if stats is not None:
                    done[name] = commit_shard(out_uri, stats, tracker.spools[name], out_schema, cfg.row_group_rows)
        if name not in done:
            raise RuntimeError(f"shard {name!r}: {tracker.seen[name]} rows spooled but its end row never came")
    storage.delete(storage.join(out_uri, SPOOL_DIR))  # committed spools are gone; drop their empty folders
    return done


def _resolve_device(cfg: PrecomputeConfig) -> tuple[str, str]:
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    device = cfg.device if cfg.device != "auto" else ("cuda" if gpus > 0 else "cpu")
    if device == "cuda" and gpus <= 0:
        raise ValueError("device='cuda' but the Ray cluster has no GPUs")
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    return device, dtype


def precompute(shards_uri: str, out_uri: str, cfg: PrecomputeConfig, ray_address: str | None = None,
               progress: Sink | None = None, step: str = "precompute") -> dict:
    """Encode every sample of the webdataset shards under `shards_uri` into part Parquet files under `out_uri`.

    progress: where records of samples done (of the download's image count), skips by reason and shards go, as
    `step` (Ray Data's own progress bars and the dashboard's Data view show its operators)."""
    import ray

    start = time.monotonic()
    if cfg.vae is None or cfg.text_encoder is None:
        raise ValueError("PrecomputeConfig.vae and .text_encoder are not set: pass the run's encoders "
                         "(PrecomputeConfig.for_source(source, encoders))")
    source = cfg.source or posixpath.basename(str(shards_uri).rstrip("/"))
    fingerprint = content_fingerprint(cfg, source)
    report_uri = storage.join(out_uri, "_report.json")
    if layout.is_complete(out_uri):
        report = storage.read_json(report_uri)
        _check_fingerprint(report.get("fingerprint"), fingerprint, report_uri)
        return report
    shards = list_shards(shards_uri, cfg.require_complete_input)
    dims = encoder_dims(cfg)
    out_schema = output_schema(cfg, dims)
    write_unconditional(out_uri, dims)  # before any part: training reads it with them
    stats = {}
    for name in shards:
        if storage.exists(part_uri(out_uri, name)):
            stats[name] = read_part_stats(part_uri(out_uri, name))
            _check_fingerprint(stats[name].get("fingerprint"), fingerprint, part_uri(out_uri, name))
    storage.delete(storage.join(out_uri, SPOOL_DIR))  # leftovers of a crashed run: never committed, never read
    pending = {n: u for n, u in shards.items() if n not in stats}
    reporter = Reporter(step, "samples", progress, total=_expected_samples(shards_uri)) if progress else None
    if reporter is not None:  # at once: the encoders take a while to load before the first batch
        reporter.update(sum(s["samples"] for s in stats.values()), shards=f"{len(stats)}/{len(shards)}")
    ray_cluster.connect(ray_address)
    device, dtype = _resolve_device(cfg)
    log.info("precompute %s -> %s: %d shards, %d already done, on %s/%s", shards_uri, out_uri, len(shards),
             len(stats), device, dtype)
    if pending:
        ds = build_dataset(pending, out_uri, cfg, source, out_schema, device, dtype)
        tracker = _ShardTracker(fingerprint, pending)
        commit = ray.remote(num_cpus=0, max_retries=3, resources=dict(cfg.resources))(commit_shard)
        in_flight = []

        def finish(refs):
            for s in ray.get(refs):
                stats[s["shard"]] = s
                _on_shard_committed(s)

        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(batch["shard"])):
                s = tracker.add({k: v[i] for k, v in batch.items()})
                if s is None:
                    continue
                in_flight.append(commit.remote(out_uri, s, tracker.spools[s["shard"]], out_schema,
                                               cfg.row_group_rows))
                while len(in_flight) >= cfg.max_commits_in_flight:
                    ready, in_flight = ray.wait(in_flight, num_returns=1)
                    finish(ready)
            if reporter is not None:
                _report_progress(reporter, stats, tracker, len(shards))
        finish(in_flight)
        missing = sorted(set(pending) - set(stats))
        if missing:
            raise RuntimeError(f"shards {missing} did not complete (rows seen {dict(tracker.seen)}, "
                               f"expected {tracker.total}); rerun to retry them")
        storage.delete(storage.join(out_uri, SPOOL_DIR))
    report = _report(shards_uri, out_uri, cfg, shards, stats, pending, out_schema, fingerprint, device, dtype)
    report["elapsed_s"] = round(time.monotonic() - start, 3)
    storage.write_json(report_uri, report)
    layout.mark_complete(out_uri)
    if reporter is not None:
        reporter.finish(report["samples_seen"], rows=report["rows_written"], shards=len(shards),
                        **{f"skipped {k}": v for k, v in report["skipped"].items()})
    return report


def _expected_samples(shards_uri: str) -> int | None:
    """The images the input shards hold, from their producer's report (None when it has none)."""
    uri = storage.join(shards_uri, "_report.json")
    return storage.read_json(uri).get("images_written") if storage.exists(uri) else None


def _report_progress(reporter: Reporter, stats: dict, tracker: "_ShardTracker", n_shards: int) -> None:
    """Samples seen (committed shards plus rows of shards in flight), skips by reason, shards committed."""
    skipped = Counter()
    for s in stats.values():
        skipped.update(s["skipped"])
    for name, c in tracker.skipped.items():
        if name not in stats:  # a committed shard's skips are in its stats already
            skipped.update(c)
    in_flight = sum(n for name, n in tracker.seen.items() if name not in stats)
    reporter.update(sum(s["samples"] for s in stats.values()) + in_flight, shards=f"{len(stats)}/{n_shards}",
                    **{f"skipped {k}": v for k, v in sorted(skipped.items())})


def _check_fingerprint(found: dict | None, expected: dict, where: str) -> None:
    if found != expected:
        diff = sorted(k for k in set(found or {}) | set(expected) if (found or {}).get(k) != expected.get(k))
        raise ValueError(f"{where!r} was made with different settings {diff} ({found} vs now {expected}); "
                         "use a fresh output folder or the same settings")


def _report(shards_uri, out_uri, cfg, shards, stats, pending, out_schema, fingerprint, device, dtype) -> dict:
    skipped, handled = Counter(), Counter()
    for s in stats.values():
        skipped.update(s["skipped"])
        handled.update(s["handled"])
    return {
        "shards_uri": shards_uri, "out_uri": out_uri, "source": fingerprint["source"],
        "rows_written": sum(s["rows"] for s in stats.values()),
        "rows_written_this_run": sum(stats[n]["rows"] for n in pending),
        "samples_seen": sum(s["samples"] for s in stats.values()),
        "skipped": dict(sorted(skipped.items())), "handled": dict(sorted(handled.items())),
        "shards": {"total": len(shards), "processed": len(pending), "already_done": len(shards) - len(pending),
                   "errors": {n: s["error"] for n, s in sorted(stats.items()) if s["error"]}},
        "schema": {f.name: str(f.type) + (f" shape {schema.field_shape(f)}" if f.metadata else "")
                   for f in out_schema},
        "device": device, "dtype": dtype, "fingerprint": fingerprint, "config": cfg.model_dump(mode="json"),
    }

