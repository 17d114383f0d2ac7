"""Ray Data stages of the precompute step: tar shard -> rows -> pixels -> latents, caption states (+ REPA) -> spool.

Each stage maps a numpy batch (`dict[str, np.ndarray]`) to another. Rows carry their shard's name and a `reason`
("" for a usable sample, else the skip reason) so no sample is dropped between stages: skipped rows travel to the
spool writer, which counts them. Each shard also sends one end row (`is_end`, `total` = its sample count) so the
driver knows when every row of a shard has been spooled. Readers, decoders and the spool writer are configured
callable *instances* (Ray Data runs them as tasks); the encoders are callable *classes* (Ray Data runs them on an
actor pool, loading the model once per actor).
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
import uuid
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from model.encoders import load_repa_encoder
from model.encoders import load_text_encoder
from model.encoders import load_vae
from pipeline.core import schema, storage
from pipeline.core.images import prepare

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SPOOL_DIR = "_spool"
# Skip reasons this module adds to pipeline.core.images.SkipReason.
MISSING_IMAGE, DUPLICATE_KEY, EMPTY_CAPTION = "missing_image", "duplicate_key", "empty_caption"


def pixel_column(resolution: int) -> str:
    return f"pixels_{int(resolution)}"


def _strings(values) -> np.ndarray:
    return np.array(list(values), dtype=object)


# ------------------------------------------------------------------------------------------ read


def split_tar(data: bytes) -> tuple[list[tuple[str, dict[str, bytes]]], str]:
    """Group a webdataset tar's members into (key, {ext: bytes}) samples in order; also a read error, or ""."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    error = ""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                if "." not in base or base.startswith("."):
                    continue
                key, ext = base.split(".", 1)  # webdataset: the key ends at the first dot
                payload = tf.extractfile(member).read()
                if len(payload) != member.size:
                    raise tarfile.ReadError(f"member {member.name!r} is cut short")
                if not samples or samples[-1][0] != key or ext.lower() in samples[-1][1]:
                    samples.append((key, {}))
                samples[-1][1][ext.lower()] = payload
    except (tarfile.TarError, EOFError, OSError) as e:  # truncated or corrupt archive: keep what was read
        error = f"{type(e).__name__}: {e}"
    return samples, error


class ReadShard:
    """One shard URI per input row -> its samples as raw-bytes rows (in batches), then one end row."""

    def __init__(self, batch_rows: int = 64):
        self.batch_rows = batch_rows

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for uri, name in zip(batch["uri"], batch["shard"]):
            # One GET per shard, before anything is yielded: a storage failure raises here and Ray retries the
            # whole task cleanly; a corrupt archive is data, recorded on the end row.
            samples, error = split_tar(storage.read_bytes(str(uri)))
            rows, seen = [], set()
            for key, parts in samples:
                ext = next((e for e in IMAGE_EXTS if e in parts), None)
                reason = DUPLICATE_KEY if key in seen else ("" if ext else MISSING_IMAGE)
                seen.add(key)
                rows.append((key, parts.get(ext, b"") if ext else b"", parts.get("txt"), reason))
            for start in range(0, len(rows), self.batch_rows):
                yield self._batch(str(name), rows[start:start + self.batch_rows], start)
            yield {**self._batch(str(name), [("", b"", b"", "")], -1),
                   "is_end": np.array([True]), "total": np.array([len(rows)], np.int64),
                   "error": _strings([error])}

    @staticmethod
    def _batch(name: str, rows: list, start: int) -> dict[str, np.ndarray]:
        n = len(rows)
        return {
            "shard": _strings([name] * n),
            "seq": np.arange(start, start + n, dtype=np.int64) if start >= 0 else np.full(n, -1, np.int64),
            "key": _strings(r[0] for r in rows),
            "image": _strings(r[1] for r in rows),
            "caption_raw": _strings(r[2] if r[2] is not None else b"" for r in rows),
            "has_caption": np.array([r[2] is not None for r in rows], dtype=bool),
            "reason": _strings(r[3] for r in rows),
            "is_end": np.zeros(n, dtype=bool),
            "total": np.full(n, -1, np.int64),
            "error": _strings([""] * n),
        }


# ---------------------------------------------------------------------------------------- decode


def decode_caption(raw: bytes, present: bool) -> tuple[str, list[str]]:
    """Caption text and the handled cases it hit (non-UTF-8 bytes are replaced, not dropped)."""
    flags = []
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        flags.append("caption_not_utf8")
    if text.startswith("\ufeff"):
        text = text[1:]
    if not present or not text.strip():
        flags.append(EMPTY_CAPTION)
    return text, flags


def source_mode(data: bytes) -> str | None:
    """The stored pixel mode (header only), to count converted CMYK/palette/16-bit/alpha images."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return f"{im.mode}+transparency" if "transparency" in im.info else im.mode
    except Exception:  # noqa: BLE001 - decode_image reports the real reason
        return None


class DecodeImages:
    """Raw rows -> caption text, original size, and uint8 (3, R, R) crops per resolution (zeros where absent)."""

    def __init__(self, resolutions: list[int], min_side: int | None, max_pixels: int, empty_captions: str):
        self.resolutions = sorted(int(r) for r in resolutions)
        self.min_side, self.max_pixels, self.empty_captions = min_side, max_pixels, empty_captions

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["key"])
        out = {k: batch[k] for k in ("shard", "seq", "key", "is_end", "total", "error")}
        reasons, captions, flags = list(batch["reason"]), [], []
        width, height = np.zeros(n, np.int32), np.zeros(n, np.int32)
        pixels = {r: np.zeros((n, 3, r, r), np.uint8) for r in self.resolutions}  # (N, 3, R, R)
        has = {r: np.zeros(n, bool) for r in self.resolutions}
        for i in range(n):
            text, row_flags = decode_caption(bytes(batch["caption_raw"][i]), bool(batch["has_caption"][i]))
            captions.append(text)
            if batch["is_end"][i] or reasons[i]:
                flags.append("")
                continue
            if EMPTY_CAPTION in row_flags and self.empty_captions == "skip":
                reasons[i] = EMPTY_CAPTION
                flags.append("")
                continue
            data = bytes(batch["image"][i])
            prep = prepare(data, self.resolutions, self.min_side, self.max_pixels)
            if prep.reason is not None:
                reasons[i] = prep.reason.value
                flags.append("")
                continue
            mode = source_mode(data)
            if mode and mode != "RGB":
                row_flags.append(f"mode_{mode}")
            width[i], height[i] = prep.width, prep.height
            for r, a in prep.arrays.items():
                if a is not None:  # lossless: a = u8 / 127.5 - 1 in float32
                    pixels[r][i] = np.rint((a + 1.0) * 127.5).astype(np.uint8)
                    has[r][i] = True
            flags.append(",".join(row_flags))
        out.update(caption=_strings(captions), reason=_strings(reasons), flags=_strings(flags),
                   width=width, height=height)
        for r in self.resolutions:
            out[pixel_column(r)], out[schema.has_column(r)] = pixels[r], has[r]
        return out


def usable(batch: dict[str, np.ndarray]) -> np.ndarray:
    """(N,) bool: rows that are samples and were not skipped."""
    return ~batch["is_end"].astype(bool) & (batch["reason"].astype(str) == "")


# -------------------------------------------------------------------------------------- encoders


def row_seed(seed: int, key: str, resolution: int) -> int:
    """A 63-bit seed per (run seed, row key, resolution): the posterior sample of a row never depends on its batch."""
    digest = hashlib.blake2b(f"{seed}/{key}/{resolution}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _padded_chunks(idx: np.ndarray, size: int) -> Iterator[tuple[np.ndarray, int]]:
    for start in range(0, len(idx), size):
        chunk = idx[start:start + size]
        yield chunk, size - len(chunk)


class EncodeImages:
    """Actor: uint8 crops -> VAE latents (float16, one posterior sample x scaling), per resolution.

    Every encoder call has exactly `batch_size` rows (the last chunk is padded): kernels pick their algorithm by
    shape, so a fixed shape plus a per-row generator makes a row's latent independent of how Ray batched it.
    """

    def __init__(self, vae_spec: str, resolutions: list[int], batch_size: int, device: str, dtype: str, seed: int):
        import torch

        if device.startswith("cuda"):
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        self.torch = torch
        self.vae = load_vae(vae_spec, device, getattr(torch, dtype))
        self.resolutions, self.batch_size, self.seed = sorted(resolutions), batch_size, seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch, f, c = self.torch, self.vae.downsample, self.vae.latent_channels
        ok, keys = usable(batch), batch["key"]
        out = {k: v for k, v in batch.items() if not k.startswith("pixels_")}
        for r in self.resolutions:
            pix = batch.pop(pixel_column(r))  # (N, 3, R, R) uint8
            lat = np.zeros((len(ok), c, r // f, r // f), np.float16)  # (N, C, R/f, R/f)
            idx = np.flatnonzero(ok & batch[schema.has_column(r)])
            for chunk, pad in _padded_chunks(idx, self.batch_size):
                x = pix[chunk].astype(np.float32) / 127.5 - 1.0  # same arithmetic as images.preprocess
                x = np.concatenate([x, np.zeros((pad, 3, r, r), np.float32)]) if pad else x
                gens = [torch.Generator().manual_seed(row_seed(self.seed, str(keys[i]), r)) for i in chunk]
                gens += [torch.Generator().manual_seed(0) for _ in range(pad)]
                z = self.vae.encode(torch.from_numpy(x), generator=gens)  # (B, C, R/f, R/f) float32
                lat[chunk] = z[:len(chunk)].cpu().numpy().astype(np.float16)
            out[schema.latent_column(r)] = lat
        return out


class EncodeRepa:
    """Actor: each row's crop at its largest resolution -> REPA's DINOv2 patch features (float16, tokens x width).

    Runs before EncodeImages, which drops the pixels. Every usable row has a crop at some resolution (else it was
    skipped as too small); all crops are the same square centre crop, so the largest is the sharpest view of what
    every latent of the row shows. Fixed-size encoder calls, as in EncodeImages.
    """

    def __init__(self, repa_spec: str, resolutions: list[int], batch_size: int, device: str, dtype: str):
        import torch

        self.torch = torch
        self.encoder = load_repa_encoder(repa_spec, device, getattr(torch, dtype))
        self.resolutions, self.batch_size = sorted(resolutions, reverse=True), batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch, enc, ok = self.torch, self.encoder, usable(batch)
        feats = np.zeros((len(ok), *enc.shape), np.float16)  # (N, T, D)
        todo = ok.copy()
        for r in self.resolutions:  # largest first
            idx = np.flatnonzero(todo & batch[schema.has_column(r)])
            todo[idx] = False
            pix = batch[pixel_column(r)]  # (N, 3, R, R) uint8
            for chunk, pad in _padded_chunks(idx, self.batch_size):
                x = pix[chunk].astype(np.float32) / 127.5 - 1.0
                x = np.concatenate([x, np.zeros((pad, 3, r, r), np.float32)]) if pad else x
                f = enc.encode(torch.from_numpy(x))  # (B, T, D) float32
                feats[chunk] = f[:len(chunk)].cpu().numpy().astype(np.float16)
        if todo.any():
            raise RuntimeError(f"rows {np.flatnonzero(todo).tolist()} are usable but have no crop at any resolution")
        return {**batch, schema.REPA_FEATURES: feats}


class EncodeCaptions:
    """Actor: captions -> text tower token states (float16, 77 x width) and the truncation flag."""

    def __init__(self, text_spec: str, batch_size: int, device: str, dtype: str, max_tokens: int,
                 mode: str = "release"):
        import torch

        self.encoder = load_text_encoder(text_spec, device, getattr(torch, dtype), tokens=max_tokens, mode=mode)
        if self.encoder.context_length != max_tokens:
            raise ValueError(f"text encoder {text_spec!r} has context length {self.encoder.context_length}, "
                             f"expected max_caption_tokens={max_tokens}")
        self.batch_size, self.max_tokens = batch_size, max_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        enc, ok = self.encoder, usable(batch)
        captions = [str(c) for c in batch["caption"]]
        states = np.zeros((len(ok), enc.context_length, enc.width), np.float16)  # (N, 77, W)
        truncated = np.zeros(len(ok), bool)
        lengths = np.full(len(ok), enc.context_length, np.int32)  # rows stored per caption (compact storage)
        compact = getattr(enc, "mode", None) == "compact"
        idx = np.flatnonzero(ok)
        for chunk, pad in _padded_chunks(idx, self.batch_size):  # fixed shape: see EncodeImages
            texts = [captions[i] for i in chunk]
            truncated[chunk] = np.array(enc.count_tokens(texts)) > self.max_tokens
            if compact:
                s, n = enc.encode_with_lengths(texts + [""] * pad)  # (B, L, W) float32, (B,)
                lengths[chunk] = n[:len(chunk)].numpy()
            else:
                s = enc.encode(texts + [""] * pad)  # (B, 77, W) float32
            states[chunk] = s[:len(chunk)].cpu().numpy().astype(np.float16)
        return {**batch, schema.CAPTION_STATES: states, "caption_truncated": truncated, "caption_tokens": lengths}


# ----------------------------------------------------------------------------------------- spool


def rows_table(batch: dict[str, np.ndarray], rows: np.ndarray, source: str, resolutions: list[int],
               out_schema: pa.Schema) -> pa.Table:
    """Arrow table in the exact latent schema for the given row indices of an encoded batch."""
    cols = {
        "key": pa.array([f"{source}/{batch['key'][i]}" for i in rows], pa.string()),
        "caption": pa.array([str(batch["caption"][i]) for i in rows], pa.string()),
        "source": pa.array([source] * len(rows), pa.string()),
        "width": pa.array(batch["width"][rows].astype(np.int32), pa.int32()),
        "height": pa.array(batch["height"][rows].astype(np.int32), pa.int32()),
        "caption_truncated": pa.array(batch["caption_truncated"][rows].astype(bool), pa.bool_()),
    }
    for r in resolutions:
        has = batch[schema.has_column(r)][rows].astype(bool)
        lat = batch[schema.latent_column(r)][rows]
        field = out_schema.field(schema.latent_column(r))
        cols[field.name] = schema.tensor_array([lat[j] if has[j] else None for j in range(len(rows))], field)
        cols[schema.has_column(r)] = pa.array(has, pa.bool_())
    field = out_schema.field(schema.CAPTION_STATES)
    if schema.is_compact(field):  # only each caption's own rows; the reader re-pads with the field's pad row
        cols[field.name] = schema.compact_array(list(batch[schema.CAPTION_STATES][rows]),
                                                batch["caption_tokens"][rows], field)
    else:
        cols[field.name] = schema.tensor_array(list(batch[schema.CAPTION_STATES][rows]), field)
    if schema.REPA_FEATURES in out_schema.names:
        field = out_schema.field(schema.REPA_FEATURES)
        cols[field.name] = schema.tensor_array(list(batch[schema.REPA_FEATURES][rows]), field)
    return pa.Table.from_arrays([cols[f.name] for f in out_schema], schema=out_schema)


def row_counts(batch: dict[str, np.ndarray], rows: np.ndarray, resolutions: list[int]) -> tuple[Counter, Counter]:
    """(skipped by reason, handled cases) over the given sample rows."""
    skipped, handled = Counter(), Counter()
    for i in rows:
        reason = str(batch["reason"][i])
        if reason:
            skipped[reason] += 1
            continue
        handled.update(f for f in str(batch["flags"][i]).split(",") if f)
        handled["caption_truncated"] += int(batch["caption_truncated"][i])
        for r in resolutions:
            handled[f"absent_{r}"] += int(not batch[schema.has_column(r)][i])
    return +skipped, +handled


class SpoolWriter:
    """Encoded rows -> one spool Parquet per shard in the batch, and one summary row per shard for the driver."""

    def __init__(self, out_uri: str, source: str, resolutions: list[int], out_schema: pa.Schema):
        self.out_uri, self.source, self.resolutions = out_uri, source, sorted(resolutions)
        self.out_schema = out_schema

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        summary: dict[str, list] = {k: [] for k in ("shard", "rows", "written", "total", "error", "spool",
                                                     "skipped", "handled")}
        shards = batch["shard"].astype(str)
        is_end, ok = batch["is_end"].astype(bool), usable(batch)
        for name in sorted(set(shards)):
            mine = shards == name
            samples, good = np.flatnonzero(mine & ~is_end), np.flatnonzero(mine & ok)
            spool = ""
            if len(good):
                table = rows_table(batch, good, self.source, self.resolutions, self.out_schema)
                spool = storage.join(self.out_uri, SPOOL_DIR, name, f"{uuid.uuid4().hex}.parquet")
                storage.write_parquet(spool, table, **schema.parquet_options(table.schema))
            ends = np.flatnonzero(mine & is_end)
            skipped, handled = row_counts(batch, samples, self.resolutions)
            summary["shard"].append(name)
            summary["rows"].append(len(samples))
            summary["written"].append(len(good))
            summary["total"].append(int(batch["total"][ends[0]]) if len(ends) else -1)
            summary["error"].append(str(batch["error"][ends[0]]) if len(ends) else "")
            summary["spool"].append(spool)
            summary["skipped"].append(json.dumps(skipped))
            summary["handled"].append(json.dumps(handled))
        return {k: np.array(v, dtype=np.int64 if k in ("rows", "written", "total") else object)
                for k, v in summary.items()}
