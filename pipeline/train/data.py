"""Training data: Ray Data streams of precomputed latents, a weighted mixture, and a resumable position.

Driver side: `build_datasets` reads each source's Parquet files (file order shuffled once with the seed), keeps
only the tensor columns, drops rows without a latent at the stage's resolution (`has_<R>`), and reshapes the
flat float16 columns into (N, C, H, W) latents and (N, L, D) caption states. A source whose Parquet holds less
than `cache_bytes` (uncompressed) is materialized into Ray's object store once, in order: otherwise every epoch
re-reads and re-decodes it, which on a few hundred rows costs more than the training step (1.4 s an epoch of 11
batches, measured). Ray Train splits every dataset across workers with `preserve_order` on, so the split (and the
whole data order) is a function of the seed.

Worker side: `MixtureStream` draws each micro-batch from one source, chosen with the source weights by an RNG
seeded from (seed, step, micro-step): every rank picks the same source, so the split iterators advance in
lockstep. Each source repeats epoch after epoch; its position (epoch, batches taken) is checkpointed and a
resumed run skips to it, so the batches after a resume are the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core import schema, storage

LATENTS, CAPTION = "latents", "caption"


def parquet_files(uri: str) -> list[str]:
    """The Parquet files of one latents folder (FileNotFoundError naming it when there are none)."""
    files = storage.list_files(uri, ".parquet", recursive=True)
    if not files:
        raise FileNotFoundError(f"no .parquet files under latents folder {uri!r}")
    return files


def caption_field(uri: str) -> pa.Field:
    """The caption-states field of a source's Parquet schema (with its shape, layout and pad metadata)."""
    fs, path = storage.filesystem(parquet_files(uri)[0])
    return pq.read_schema(path, filesystem=fs).field(schema.CAPTION_STATES)


def unconditional(latents: Mapping[str, str]) -> np.ndarray | None:
    """The sources' shared unconditional caption (tokens, width) float32 from `_unconditional.safetensors`;
    None when no source has one; ValueError when only some have one or they differ."""
    found = {s: schema.read_unconditional(uri) for s, uri in sorted(latents.items())}
    have = {s: u for s, u in found.items() if u is not None}
    if not have:
        return None
    if len(have) != len(found):
        raise ValueError(f"sources {sorted(set(found) - set(have))} have no {schema.UNCONDITIONAL_FILE} but "
                         f"{sorted(have)} do: their captions come from different text encoders")
    first = next(iter(have.values()))
    differ = sorted(s for s, u in have.items() if u.shape != first.shape or not np.array_equal(u, first))
    if differ:
        raise ValueError(f"sources {differ} have another unconditional caption than {sorted(have)[0]!r}: "
                         "their captions come from different text encoders")
    return first


def source_shapes(uri: str, resolution: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(latent shape (C, H, W), caption shape (L, D)) read from a source's Parquet schema."""
    first = parquet_files(uri)[0]
    fs, path = storage.filesystem(first)
    s = pq.read_schema(path, filesystem=fs)
    try:
        schema.validate(s, [resolution])
    except ValueError as e:
        raise ValueError(f"{first!r}: {e}") from e
    return schema.field_shape(s.field(schema.latent_column(resolution))), schema.field_shape(
        s.field(schema.CAPTION_STATES))


class DecodeLatents:
    """Ray Data stage: float16 byte columns -> {"latents": (N, C, H, W), "caption": (N, L, D)} float16 arrays."""

    def __init__(self, resolution: int, latent_shape: tuple[int, ...], caption_shape: tuple[int, ...],
                 caption_field: pa.Field | None = None, extras: Mapping[str, tuple[int, ...]] | None = None):
        self.column = schema.latent_column(resolution)
        # Further tensor columns passed through under their own names (e.g. REPA features): {column: shape}.
        self.extras = {k: tuple(v) for k, v in (extras or {}).items()}
        self.has = schema.has_column(resolution)
        self.latent_shape, self.caption_shape = tuple(latent_shape), tuple(caption_shape)
        # Compact caption states (Llama): re-padded with the field's pad row, which the driver read from the
        # file's schema (Ray's blocks need not keep field metadata).
        self.caption_field = caption_field if caption_field is not None and schema.is_compact(caption_field) \
            else None

    @staticmethod
    def _flat(table: pa.Table, column: str, shape: tuple[int, ...]) -> np.ndarray:
        col = table.column(column).combine_chunks()
        if col.null_count:
            raise ValueError(f"column {column!r} has null rows where {column.replace('latents', 'has')} is True")
        return schema.flat_values(col, int(np.prod(shape))).reshape((len(col), *shape))  # float16

    def __call__(self, table: pa.Table) -> dict[str, np.ndarray]:
        has = table.column(self.has)
        if has.null_count or not pc.all(has).as_py():  # filtering copies every column: only when rows drop
            table = table.filter(has)  # 512-px stages: only images at least that large
        if self.caption_field is not None:
            col = table.column(schema.CAPTION_STATES).combine_chunks()
            caption = schema.repad(col, self.caption_field, np.float16)  # (N, L, D)
        else:
            caption = self._flat(table, schema.CAPTION_STATES, self.caption_shape)
        out = {LATENTS: self._flat(table, self.column, self.latent_shape), CAPTION: caption}
        return {**out, **{k: self._flat(table, k, shape) for k, shape in self.extras.items()}}


def dataset_name(source: str, sources: Mapping[str, Any]) -> str:
    """Name of a source's dataset in the trainer: "train" for a lone source, else "train_<source>"."""
    return "train" if len(sources) == 1 else f"train_{source}"


def read_footer(uri: str) -> pq.FileMetaData:
    """One latent file's Parquet footer; ValueError naming the file when it is not readable Parquet."""
    fs, path = storage.filesystem(uri)
    try:
        return pq.read_metadata(path, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as e:
        size = fs.get_file_info(path).size
        raise ValueError(f"latent file {uri!r} ({size} bytes) is not a readable Parquet file (truncated or "
                         f"damaged): {e}; delete it and rerun precompute for this source") from None


def _footers(uri: str) -> list[pq.FileMetaData]:
    return [read_footer(f) for f in parquet_files(uri)]


def source_rows(uri: str) -> int:
    """Rows in a source's Parquet files, from their footers."""
    return sum(m.num_rows for m in _footers(uri))


def source_bytes(uri: str) -> int:
    """Uncompressed bytes of a source's Parquet files (all columns), from their footers."""
    return sum(m.row_group(i).total_byte_size for m in _footers(uri) for i in range(m.num_row_groups))


def candidate_sources(latents: Mapping[str, str], mixture: Mapping[str, float],
                      exclude: tuple[str, ...] | list[str] = ()) -> dict[str, str]:
    """The sources a stage may draw from (mixture and exclusions applied, weights not yet read): their files are
    checked before anything reads their footers."""
    missing = sorted(s for s, w in mixture.items() if s not in latents and w > 0)
    if missing:
        raise ValueError(f"mixture names source(s) {missing} that have no latents; available: {sorted(latents)}")
    names = [s for s, w in mixture.items() if w > 0] if mixture else list(latents)
    found = {s: latents[s] for s in sorted(names) if s in latents and s not in set(exclude)}
    if not found:
        raise ValueError(f"no source left to train on: latents {sorted(latents)}, mixture {dict(mixture)}, "
                         f"exclude_sources {list(exclude)}")
    return found


def mixture_weights(latents: Mapping[str, str], mixture: Mapping[str, float],
                    exclude: tuple[str, ...] | list[str] = ()) -> dict[str, float]:
    """Normalised sampling weights over the sources used.

    Empty `mixture`: the union of all sources not excluded, weighted by their row counts. Otherwise exactly
    the listed weights (unlisted sources are left out; a listed source without latents is an error unless
    its weight is 0).
    """
    used = candidate_sources(latents, mixture, exclude)
    raw = {s: float(mixture[s]) if mixture else float(source_rows(uri)) for s, uri in used.items()}
    total = sum(raw.values())
    return {s: w / total for s, w in sorted(raw.items())}


def build_datasets(latents: Mapping[str, str], resolution: int, seed: int, cache_bytes: int = 0,
                   extras: Mapping[str, tuple[int, ...]] | None = None) -> tuple[dict, dict]:
    """Ray Datasets per source for the trainer's `datasets=` and the shapes, checked equal across sources.

    Sources under `cache_bytes` are materialized (in file order) so epochs after the first read the object store.
    `extras` ({column: shape}) are read and batched under their column names too; only what the stage's objective
    uses is read (REPA features are 384 KiB a row at the paper's shape).
    """
    import ray.data

    datasets, shapes = {}, None
    for source, uri in sorted(latents.items()):
        s = source_shapes(uri, resolution)
        if shapes is not None and s != shapes:
            raise ValueError(f"source {source!r} has latent/caption shapes {s}, others {shapes}")
        shapes = s
        files = parquet_files(uri)
        random.Random(f"{seed}:{source}").shuffle(files)  # file-level shuffle, fixed by the seed
        fs, _ = storage.filesystem(uri)
        paths = [storage.filesystem(f)[1] for f in files]
        ds = ray.data.read_parquet(paths, filesystem=fs)
        ds = ds.select_columns([schema.latent_column(resolution), schema.has_column(resolution),
                                schema.CAPTION_STATES, *(extras or {})])
        # An instance (not the class) runs as plain tasks: the stage holds no heavy state worth an actor.
        ds = ds.map_batches(DecodeLatents(resolution, *s, caption_field(uri), extras), batch_format="pyarrow",
                            batch_size=None)
        if cache_bytes and source_bytes(uri) < cache_bytes:
            ds.context.execution_options.preserve_order = True  # the cached block order is the file order
            ds = ds.materialize()
        datasets[dataset_name(source, latents)] = ds
    return datasets, {"latent_shape": list(shapes[0]), "caption_shape": list(shapes[1])}


def fixed_prompts(uri: str, resolution: int, count: int) -> tuple[list[str], np.ndarray]:
    """The first `count` (caption, caption states (count, L, D) float32) with a latent at `resolution`."""
    fs, _ = storage.filesystem(uri)
    captions, states = [], []
    columns = ["caption", schema.CAPTION_STATES, schema.has_column(resolution)]
    for f in parquet_files(uri):
        if len(captions) >= count:
            break
        with fs.open_input_file(storage.filesystem(f)[1]) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=max(count, 1), columns=columns):
                t = pa.Table.from_batches([batch])
                t = t.filter(t.column(schema.has_column(resolution))).slice(0, count - len(captions))
                captions += t.column("caption").to_pylist()
                states.append(schema.read_tensor(t, schema.CAPTION_STATES))
                if len(captions) >= count:
                    break
    return captions, np.concatenate(states) if states else np.zeros((0,), np.float32)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass
class SourcePosition:
    """Where a source's stream stands: epoch number and micro-batches taken from it in that epoch."""

    epoch: int = 0
    batches: int = 0


class MixtureStream:
    """Infinite stream of this worker's micro-batches from a weighted mixture of split datasets."""

    def __init__(self, shards: Mapping[str, Any], weights: Mapping[str, float], micro_batch: int, seed: int,
                 shuffle_buffer: int, rank: int):
        self.shards, self.micro_batch, self.seed, self.rank = dict(shards), micro_batch, seed, rank
        self.names = sorted(weights)
        self.weights = [weights[n] for n in self.names]
        self.shuffle_buffer = shuffle_buffer
        self.position = {n: SourcePosition() for n in self.names}
        self._iters: dict[str, Iterator] = {}

    def _epoch_batches(self, name: str, epoch: int) -> Iterator[dict]:
        # The local shuffle seed changes per epoch and rank, so every epoch is a new order, reproducibly.
        shuffle = dict(local_shuffle_buffer_size=self.shuffle_buffer,
                       local_shuffle_seed=(self.seed * 1_000_003 + epoch * 7919 + self.rank) % 2**31) \
            if self.shuffle_buffer else {}
        # "auto": the Ray Train worker's device, so on a GPU the copy (from pinned memory) runs on Ray's
        # background fetch thread, overlapping the step, instead of a blocking copy in the loop.
        return iter(self.shards[name].iter_torch_batches(batch_size=self.micro_batch, drop_last=True,
                                                           device="auto", pin_memory=_cuda(), **shuffle))

    def _stream(self, name: str) -> Iterator[dict]:
        pos = self.position[name]
        skip = pos.batches
        while True:
            taken = 0
            for i, batch in enumerate(self._epoch_batches(name, pos.epoch)):
                taken += 1
                if i < skip:  # resuming mid-epoch: replay the same order up to where the checkpoint was
                    continue
                pos.batches = i + 1
                yield batch
            if taken == 0:
                raise ValueError(f"source {name!r} gives no full micro-batch of {self.micro_batch} rows per "
                                 f"worker; add rows or lower micro_batch")
            pos.epoch, pos.batches, skip = pos.epoch + 1, 0, 0

    def choose(self, step: int, micro: int) -> str:
        """The source of micro-batch `micro` of step `step` (same on every rank)."""
        if len(self.names) == 1:
            return self.names[0]
        rng = random.Random(f"{self.seed}:{step}:{micro}")
        return rng.choices(self.names, weights=self.weights)[0]

    def next(self, step: int, micro: int) -> dict:
        """The next micro-batch {"latents": (B, C, H, W), "caption": (B, L, D)} (float16 tensors)."""
        name = self.choose(step, micro)
        if name not in self._iters:
            self._iters[name] = self._stream(name)
        return next(self._iters[name])

    def state_dict(self) -> dict[str, Any]:
        return {n: [p.epoch, p.batches] for n, p in self.position.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore positions (before the first `next`); sources new to this stage start at epoch 0."""
        if self._iters:
            raise RuntimeError("load_state_dict must come before the stream is read")
        for n, (epoch, batches) in state.items():
            if n in self.position:
                self.position[n] = SourcePosition(int(epoch), int(batches))
