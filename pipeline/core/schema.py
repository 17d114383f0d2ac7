"""The Parquet schema of precomputed training rows, readable with shapes by plain pyarrow.

Tensors are stored as raw little-endian float16 bytes, one `fixed_size_binary` value a row, with their shape in
the field metadata (`b"shape": b"[4, 32, 32]"`), so any Arrow reader gets a typed column and `read_tensor` gets
the N-d array back without Ray's extension types. Raw bytes, not `fixed_size_list<halffloat>`: Parquet decodes a
list column value by value with its repetition levels, a byte column as one copy (bench/README.md, "Training input
at real row sizes": 24x less CPU a row, the input path's main cost). Files written with the earlier
`fixed_size_list<f16>` / `list<f16>` columns are still read.

| column                | type                          | meaning                                          |
|-----------------------|-------------------------------|--------------------------------------------------|
| key                   | string                        | unique row id, `<source>/<img2dataset key>`      |
| caption               | string                        | full caption text (never truncated)              |
| source                | string                        | dataset name                                     |
| width, height         | int32                         | original image size in pixels                    |
| caption_truncated     | bool                          | caption had more than 77 tokens                  |
| latents_<R>           | fixed_size_binary, nullable   | VAE latent at R px (C x R/f x R/f), x scaling    |
| has_<R>               | bool                          | False where the short side was below R           |
| caption_states        | fixed_size_binary             | text tower token states (77 x width)             |
| repa_features         | fixed_size_binary             | only with `encoders.repa`: DINOv2 patch features |
|                       |                               | (tokens x width, 256 x 768 for dinov2-base)      |

Compact caption states (Llama, E-MMDiT): a caption's pad rows are all one vector, so `caption_states` is then a
variable-length `large_binary` holding only the caption's own rows (n x width float16, n <= tokens); the field
metadata carries the full shape, `b"layout": b"compact"` and the pad row (`b"pad"`: base64 float16 bytes), and
`read_tensor` re-pads to (tokens x width). A source written so also holds `_unconditional.safetensors` (the
empty prompt's embedding, `unconditional` (tokens, width), and the pad row `pad` (width,)) beside its parts.

REPA features (E-MMDiT stage 1) come from the crop at the largest of the source's resolutions the image has (the
same square centre crop every latent is made from), resized to the encoder's input (224 px for dinov2-base, the
paper's stage-1 512-px image at 224 px). Every written row has them: 256 x 768 float16 = 384 KiB a row, which is
why training reads the column only for a stage whose objective uses it.
"""
from __future__ import annotations

import base64
import json
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from pipeline.core import storage

VALUE = np.dtype("<f2")  # every stored tensor value: little-endian float16
CAPTION_STATES = "caption_states"
REPA_FEATURES = "repa_features"  # the batch key the rectified-flow objective reads them under, too
UNCONDITIONAL_FILE = "_unconditional.safetensors"  # beside a source's parts when its captions have one
SCALAR_FIELDS = [
    pa.field("key", pa.string(), nullable=False),
    pa.field("caption", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("caption_truncated", pa.bool_(), nullable=False),
]


def latent_column(resolution: int) -> str:
    return f"latents_{int(resolution)}"


def has_column(resolution: int) -> str:
    return f"has_{int(resolution)}"


def tensor_field(name: str, shape: Sequence[int], nullable: bool = False) -> pa.Field:
    size = int(np.prod(shape))
    return pa.field(name, pa.binary(size * VALUE.itemsize), nullable=nullable,
                    metadata={b"shape": json.dumps([int(s) for s in shape]).encode()})


def compact_tensor_field(name: str, shape: Sequence[int], pad: np.ndarray) -> pa.Field:
    """A (tokens, width) column stored as each row's first n rows; `pad` (width,) fills the rest on read."""
    pad = np.asarray(pad, dtype=np.float16).reshape(-1)
    if pad.shape != (shape[-1],):
        raise ValueError(f"pad row has {pad.shape[0]} values, expected the width {shape[-1]}")
    return pa.field(name, pa.large_binary(), nullable=False,
                    metadata={b"shape": json.dumps([int(s) for s in shape]).encode(), b"layout": b"compact",
                              b"pad": base64.b64encode(pad.tobytes())})


def is_compact(field: pa.Field) -> bool:
    return bool(field.metadata) and field.metadata.get(b"layout") == b"compact"


def compact_pad(field: pa.Field) -> np.ndarray:
    """(width,) float16 pad row of a compact field."""
    return np.frombuffer(base64.b64decode(field.metadata[b"pad"]), dtype=np.float16).copy()


def compact_array(values: Sequence[np.ndarray], lengths: Sequence[int], field: pa.Field) -> pa.Array:
    """Array of a compact field from per-row full (tokens, width) arrays and their real lengths."""
    shape = field_shape(field)
    parts, offsets = [], [0]
    for v, n in zip(values, lengths):
        v = np.asarray(v)
        if v.shape != shape:
            raise ValueError(f"column {field.name!r} expects shape {shape}, got {v.shape}")
        if not 1 <= int(n) <= shape[0]:
            raise ValueError(f"column {field.name!r}: row length {n} outside [1, {shape[0]}]")
        parts.append(v[:int(n)].reshape(-1).astype(VALUE))
        offsets.append(offsets[-1] + parts[-1].nbytes)
    flat = np.concatenate(parts) if parts else np.zeros(0, VALUE)
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(parts), [
        None, pa.py_buffer(np.asarray(offsets, np.int64)), pa.py_buffer(flat)])


def _compact_rows(col: pa.Array, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(lengths (N,) in rows, values (sum of lengths, width)) of a compact column, either encoding."""
    if pa.types.is_large_binary(col.type):
        offsets = np.frombuffer(col.buffers()[1], np.int64, count=len(col) + 1, offset=col.offset * 8)
        data = col.buffers()[2]
        start, stop = int(offsets[0]), int(offsets[-1])
        values = np.frombuffer(data, VALUE, count=(stop - start) // VALUE.itemsize, offset=start) if stop > start \
            else np.zeros(0, VALUE)
        return np.diff(offsets) // (width * VALUE.itemsize), values.reshape(-1, width)
    # list<f16>: files written before the byte layout
    lengths = col.value_lengths().to_numpy(zero_copy_only=False) // width
    return lengths, col.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)


def compact_lengths(col: pa.Array, field: pa.Field) -> np.ndarray:
    """(N,) number of stored (non-pad) rows of each value of a compact column."""
    return _compact_rows(col, field_shape(field)[-1])[0]


def repad(col: pa.Array, field: pa.Field, dtype=np.float32) -> np.ndarray:
    """(N, tokens, width) array of a compact column: each row's own rows, then the field's pad row."""
    tokens, width = field_shape(field)
    lengths, values = _compact_rows(col, width)
    out = np.empty((len(col), tokens, width), dtype=dtype)
    out[:] = compact_pad(field).astype(dtype)
    real = np.arange(tokens)[None, :] < lengths[:, None]  # (N, tokens): row-major, as the values are stored
    out[real] = values.astype(dtype, copy=False)
    return out


def latent_schema(resolutions: Sequence[int], latent_channels: int, downsample: int,
                  text_tokens: int, text_width: int, text_pad: np.ndarray | None = None,
                  repa_shape: Sequence[int] | None = None) -> pa.Schema:
    """Schema for rows holding latents at each resolution plus caption states (compact when `text_pad` given),
    plus REPA features (tokens, width) when `repa_shape` is given."""
    fields = list(SCALAR_FIELDS)
    for r in resolutions:
        if r % downsample:
            raise ValueError(f"resolution {r} is not divisible by the autoencoder's downsample factor {downsample}")
        side = r // downsample
        fields.append(tensor_field(latent_column(r), (latent_channels, side, side), nullable=True))
        fields.append(pa.field(has_column(r), pa.bool_(), nullable=False))
    fields.append(tensor_field(CAPTION_STATES, (text_tokens, text_width)) if text_pad is None else
                  compact_tensor_field(CAPTION_STATES, (text_tokens, text_width), text_pad))
    if repa_shape is not None:
        fields.append(tensor_field(REPA_FEATURES, repa_shape))
    return pa.schema(fields)


def parquet_options(s: pa.Schema) -> dict:
    """`pyarrow.parquet.write_table` options for latent rows: statistics and dictionaries for the scalar columns
    only. Min/max statistics of a tensor column are two whole values (157 KB each for 77x1024 states) that every
    reader parses: measured on 64 such rows, reading took 0.68 CPU-s with them and 0.014 without."""
    scalars = [f.name for f in s if not is_tensor_field(f)]
    return {"write_statistics": scalars, "use_dictionary": scalars}


def is_tensor_field(field: pa.Field) -> bool:
    return bool(field.metadata) and b"shape" in field.metadata


def field_shape(field: pa.Field) -> tuple[int, ...]:
    if not is_tensor_field(field):
        raise ValueError(f"column {field.name!r} carries no shape metadata; is this a microdit latent file?")
    return tuple(json.loads(field.metadata[b"shape"]))


def tensor_array(values: Sequence[np.ndarray | None], field: pa.Field) -> pa.Array:
    """Arrow array for `field` from per-row arrays (None -> null where the field is nullable)."""
    shape = field_shape(field)
    size = int(np.prod(shape))
    valid = np.array([v is not None for v in values], dtype=bool)
    flat = np.zeros((len(values), size), dtype=VALUE)
    for i, v in enumerate(values):
        if v is not None:
            v = np.asarray(v)
            if v.shape != shape:
                raise ValueError(f"column {field.name!r} expects shape {shape}, got {v.shape}")
            flat[i] = v.reshape(-1)
    nulls = int((~valid).sum())
    validity = pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(size * VALUE.itemsize), len(values),
                                                [validity, pa.py_buffer(flat)], null_count=nulls)


def flat_values(col: pa.Array, size: int) -> np.ndarray:
    """(N, size) float16 values of a fixed tensor column, either encoding; a null row holds arbitrary values
    (check `col.null_count` first). Zero-copy for the byte layout."""
    if pa.types.is_fixed_size_binary(col.type):
        if col.type.byte_width != size * VALUE.itemsize:
            raise ValueError(f"tensor column holds {col.type.byte_width} bytes a row, expected {size} float16 "
                             f"values ({size * VALUE.itemsize} bytes)")
        if not len(col):
            return np.zeros((0, size), VALUE)
        return np.frombuffer(col.buffers()[1], VALUE, count=len(col) * size,
                             offset=col.offset * col.type.byte_width).reshape(len(col), size)
    # fixed_size_list<f16>: files written before the byte layout. Its child array holds every slot, null rows too
    # (`flatten()` would drop them and misalign the rest).
    values = col.values.slice(col.offset * size, len(col) * size)
    return values.to_numpy(zero_copy_only=False).reshape(len(col), size)


def read_tensor(table: pa.Table, column: str, dtype=np.float32) -> np.ndarray:
    """(N, *shape) array of a tensor column; null rows come back as NaN."""
    field = table.schema.field(column)
    shape = field_shape(field)
    col = table.column(column).combine_chunks() if table.num_rows else pa.array([], field.type)
    if is_compact(field):
        return repad(col, field, dtype)
    out = flat_values(col, int(np.prod(shape))).astype(dtype)
    if col.null_count:
        out[col.is_null().to_numpy(zero_copy_only=False)] = np.nan
    return out.reshape((len(col), *shape))


def _check_tensor_type(field: pa.Field) -> None:
    """ValueError naming the column when its Arrow type cannot hold its declared shape."""
    size = int(np.prod(field_shape(field)))
    t = field.type
    if is_compact(field):
        ok = pa.types.is_large_binary(t) or (pa.types.is_list(t) and pa.types.is_float16(t.value_type))
    elif pa.types.is_fixed_size_binary(t):
        ok = t.byte_width == size * VALUE.itemsize
    else:
        ok = pa.types.is_fixed_size_list(t) and t.list_size == size and pa.types.is_float16(t.value_type)
    if not ok:
        raise ValueError(f"column {field.name!r} has type {t} that cannot hold float16 values of shape "
                         f"{list(field_shape(field))}")


def validate(schema: pa.Schema, resolutions: Sequence[int]) -> None:
    """Raise ValueError naming what is missing when `schema` is not a latent-row schema for `resolutions`."""
    needed = [f.name for f in SCALAR_FIELDS] + [CAPTION_STATES]
    for r in resolutions:
        needed += [latent_column(r), has_column(r)]
    missing = [n for n in needed if n not in schema.names]
    if missing:
        raise ValueError(f"Parquet schema lacks column(s) {missing}; has {schema.names}")
    for name in [CAPTION_STATES] + [latent_column(r) for r in resolutions]:
        _check_tensor_type(schema.field(name))


def write_unconditional(folder_uri: str, unconditional: np.ndarray, pad: np.ndarray | None = None) -> str:
    """Write a source's `_unconditional.safetensors` ((tokens, width) float32, and compact caption storage's pad
    row (width,)); returns its URI."""
    from safetensors.numpy import save

    tensors = {"unconditional": np.ascontiguousarray(unconditional, dtype=np.float32)}
    if pad is not None:
        tensors["pad"] = np.ascontiguousarray(pad, dtype=np.float32)
    uri = storage.join(folder_uri, UNCONDITIONAL_FILE)
    storage.write_bytes(uri, save(tensors))
    return uri


def stored_text_mode(folder_uri: str) -> str | None:
    """The text mode a source's caption states were computed in, read from its `_unconditional.safetensors`:
    "compact" when it holds the pad row, else "release"; None when the folder has no such file."""
    from safetensors import safe_open

    uri = storage.join(folder_uri, UNCONDITIONAL_FILE)
    if not storage.exists(uri):
        return None
    if storage.is_s3(uri):
        from safetensors.numpy import load

        return "compact" if "pad" in load(storage.read_bytes(uri)) else "release"
    with safe_open(uri, framework="numpy") as f:
        return "compact" if "pad" in f.keys() else "release"


def read_unconditional(folder_uri: str) -> np.ndarray | None:
    """A source's unconditional caption (tokens, width) float32, or None when its folder has none."""
    from safetensors.numpy import load

    uri = storage.join(folder_uri, UNCONDITIONAL_FILE)
    if not storage.exists(uri):
        return None
    return load(storage.read_bytes(uri))["unconditional"]
