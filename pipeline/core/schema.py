"""The Parquet schema of precomputed training rows, readable with shapes by plain pyarrow.

Tensors are stored flat as `fixed_size_list<halffloat>` (float16, as docs/RECIPE.md stores them) with their shape
in the field metadata (`b"shape": b"[4, 32, 32]"`), so any Arrow reader gets a typed column and
`read_tensor` gets the N-d array back without Ray's extension types.

| column                | type                          | meaning                                          |
|-----------------------|-------------------------------|--------------------------------------------------|
| key                   | string                        | unique row id, `<source>/<img2dataset key>`      |
| caption               | string                        | full caption text (never truncated)              |
| source                | string                        | dataset name                                     |
| width, height         | int32                         | original image size in pixels                    |
| caption_truncated     | bool                          | caption had more than 77 tokens                  |
| latents_<R>           | fixed_size_list<f16>, nullable | VAE latent at R px (C x R/f x R/f), x scaling    |
| has_<R>               | bool                          | False where the short side was below R           |
| caption_states        | fixed_size_list<f16>          | text tower token states (77 x width)             |
| repa_features         | fixed_size_list<f16>          | only with `encoders.repa`: DINOv2 patch features |
|                       |                               | (tokens x width, 256 x 768 for dinov2-base)      |

Compact caption states (Llama, E-MMDiT): a caption's pad rows are all one vector, so `caption_states` is then a
variable-length `list<f16>` holding only the caption's own rows (n x width, n <= tokens); the field metadata
carries the full shape, `b"layout": b"compact"` and the pad row (`b"pad"`: base64 float16 bytes), and
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
    return pa.field(name, pa.list_(pa.float16(), size), nullable=nullable,
                    metadata={b"shape": json.dumps([int(s) for s in shape]).encode()})


def compact_tensor_field(name: str, shape: Sequence[int], pad: np.ndarray) -> pa.Field:
    """A (tokens, width) column stored as each row's first n rows; `pad` (width,) fills the rest on read."""
    pad = np.asarray(pad, dtype=np.float16).reshape(-1)
    if pad.shape != (shape[-1],):
        raise ValueError(f"pad row has {pad.shape[0]} values, expected the width {shape[-1]}")
    return pa.field(name, pa.list_(pa.float16()), nullable=False,
                    metadata={b"shape": json.dumps([int(s) for s in shape]).encode(), b"layout": b"compact",
                              b"pad": base64.b64encode(pad.tobytes())})


def is_compact(field: pa.Field) -> bool:
    return bool(field.metadata) and field.metadata.get(b"layout") == b"compact"


def compact_pad(field: pa.Field) -> np.ndarray:
    """(width,) float16 pad row of a compact field."""
    return np.frombuffer(base64.b64decode(field.metadata[b"pad"]), dtype=np.float16).copy()


def compact_array(values: Sequence[np.ndarray], lengths: Sequence[int], field: pa.Field) -> pa.Array:
    """List array of a compact field from per-row full (tokens, width) arrays and their real lengths."""
    shape = field_shape(field)
    parts, offsets = [], [0]
    for v, n in zip(values, lengths):
        v = np.asarray(v)
        if v.shape != shape:
            raise ValueError(f"column {field.name!r} expects shape {shape}, got {v.shape}")
        if not 1 <= int(n) <= shape[0]:
            raise ValueError(f"column {field.name!r}: row length {n} outside [1, {shape[0]}]")
        parts.append(v[:int(n)].reshape(-1).astype(np.float16))
        offsets.append(offsets[-1] + parts[-1].size)
    flat = np.concatenate(parts) if parts else np.zeros(0, np.float16)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, pa.float16()))


def repad(col: pa.Array, field: pa.Field, dtype=np.float32) -> np.ndarray:
    """(N, tokens, width) array of a compact column: each row's own rows, then the field's pad row."""
    tokens, width = field_shape(field)
    lengths = col.value_lengths().to_numpy(zero_copy_only=False) // width  # (N,)
    out = np.empty((len(col), tokens, width), dtype=dtype)
    out[:] = compact_pad(field).astype(dtype)
    real = np.arange(tokens)[None, :] < lengths[:, None]  # (N, tokens): row-major, as the values are stored
    out[real] = col.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(-1, width)
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
        fields.append(tensor_field(latent_column(r), (latent_channels, r // downsample, r // downsample), nullable=True))
        fields.append(pa.field(has_column(r), pa.bool_(), nullable=False))
    fields.append(tensor_field(CAPTION_STATES, (text_tokens, text_width)) if text_pad is None else
                  compact_tensor_field(CAPTION_STATES, (text_tokens, text_width), text_pad))
    if repa_shape is not None:
        fields.append(tensor_field(REPA_FEATURES, repa_shape))
    return pa.schema(fields)


def field_shape(field: pa.Field) -> tuple[int, ...]:
    if not field.metadata or b"shape" not in field.metadata:
        raise ValueError(f"column {field.name!r} carries no shape metadata; is this a microdit latent file?")
    return tuple(json.loads(field.metadata[b"shape"]))


def tensor_array(values: Sequence[np.ndarray | None], field: pa.Field) -> pa.Array:
    """Arrow array for `field` from per-row arrays (None -> null where the field is nullable)."""
    shape = field_shape(field)
    size = int(np.prod(shape))
    valid = np.array([v is not None for v in values], dtype=bool)
    flat = np.zeros((len(values), size), dtype=np.float16)
    for i, v in enumerate(values):
        if v is not None:
            v = np.asarray(v)
            if v.shape != shape:
                raise ValueError(f"column {field.name!r} expects shape {shape}, got {v.shape}")
            flat[i] = v.reshape(-1).astype(np.float16)
    storage = pa.array(flat.reshape(-1), type=pa.float16())
    arr = pa.FixedSizeListArray.from_arrays(storage, size)
    if not valid.all():
        arr = pa.FixedSizeListArray.from_arrays(storage, size, mask=pa.array(~valid))
    return arr


def read_tensor(table: pa.Table, column: str, dtype=np.float32) -> np.ndarray:
    """(N, *shape) array of a tensor column; null rows come back as NaN."""
    field = table.schema.field(column)
    shape = field_shape(field)
    col = table.column(column).combine_chunks() if table.num_rows else pa.array([], field.type)
    if is_compact(field):
        return repad(col, field, dtype)
    size = int(np.prod(shape))
    flat = col.flatten().to_numpy(zero_copy_only=False) if col.null_count == 0 else None
    if flat is None or flat.size != len(col) * size:
        out = np.full((len(col), size), np.nan, dtype=dtype)
        for i, v in enumerate(col.to_pylist()):
            if v is not None:
                out[i] = v
        return out.reshape((len(col), *shape))
    return flat.astype(dtype, copy=False).reshape((len(col), *shape))


def validate(schema: pa.Schema, resolutions: Sequence[int]) -> None:
    """Raise ValueError naming what is missing when `schema` is not a latent-row schema for `resolutions`."""
    needed = [f.name for f in SCALAR_FIELDS] + [CAPTION_STATES]
    for r in resolutions:
        needed += [latent_column(r), has_column(r)]
    missing = [n for n in needed if n not in schema.names]
    if missing:
        raise ValueError(f"Parquet schema lacks column(s) {missing}; has {schema.names}")
    for name in [CAPTION_STATES] + [latent_column(r) for r in resolutions]:
        field_shape(schema.field(name))


def write_unconditional(folder_uri: str, unconditional: np.ndarray, pad: np.ndarray) -> str:
    """Write a source's `_unconditional.safetensors` ((tokens, width) and (width,), float32); returns its URI."""
    from safetensors.numpy import save

    from pipeline.core import storage

    uri = storage.join(folder_uri, UNCONDITIONAL_FILE)
    storage.write_bytes(uri, save({"unconditional": np.ascontiguousarray(unconditional, dtype=np.float32),
                                   "pad": np.ascontiguousarray(pad, dtype=np.float32)}))
    return uri


def read_unconditional(folder_uri: str) -> np.ndarray | None:
    """A source's unconditional caption (tokens, width) float32, or None when its folder has none."""
    from safetensors.numpy import load

    from pipeline.core import storage

    uri = storage.join(folder_uri, UNCONDITIONAL_FILE)
    if not storage.exists(uri):
        return None
    return load(storage.read_bytes(uri))["unconditional"]
