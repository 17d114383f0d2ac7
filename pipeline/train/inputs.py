"""Driver-side checks of a stage's inputs, before any worker starts: every latent file readable, every schema
the same tensors of the expected shapes, nothing in it that would run code when read.

A truncated or zero-byte Parquet part, a file whose latent column has another shape, or one written by another
tool fails here with its file, column and expected shape named, instead of inside Ray workers after retries.
Parquet columns of an Arrow *extension* type other than ours are refused: Ray registers a pickled-object
extension type, and reading such a column from storage would unpickle whatever the file holds.
"""
from __future__ import annotations

from collections.abc import Mapping

import pyarrow as pa

from pipeline.core import schema
from pipeline.train.data import parquet_files, read_footer


def _read_schema(uri: str) -> pa.Schema:
    return read_footer(uri).schema.to_arrow_schema()


def _shapes(uri: str, s: pa.Schema, resolution: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    try:
        schema.validate(s, [resolution])
    except ValueError as e:
        raise ValueError(f"latent file {uri!r}: {e}") from None
    for field in s:
        if isinstance(field.type, pa.BaseExtensionType):
            raise ValueError(f"latent file {uri!r}: column {field.name!r} has extension type "
                             f"{field.type.extension_name!r}; latent files hold plain Arrow types only")
    return (schema.field_shape(s.field(schema.latent_column(resolution))),
            schema.field_shape(s.field(schema.CAPTION_STATES)))


def check_sources(latents: Mapping[str, str], resolution: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(latent shape (C, H, W), caption shape (L, D)) shared by every file of every source; ValueError naming the
    first file that is unreadable or disagrees (its column, its shape and the expected one)."""
    expected, first = None, None
    for source, uri in latents.items():
        for f in parquet_files(uri):
            shapes = _shapes(f, _read_schema(f), resolution)
            if expected is None:
                expected, first = shapes, f
                continue
            for name, got, want in (("latents_%d" % resolution, shapes[0], expected[0]),
                                    (schema.CAPTION_STATES, shapes[1], expected[1])):
                if got != want:
                    raise ValueError(f"latent file {f!r} (source {source!r}): column {name!r} has shape {got}, "
                                     f"expected {want} as in {first!r}")
    assert expected is not None  # parquet_files raises on an empty source
    return expected


def check_repa_features(latents: Mapping[str, str], shape: tuple[int, ...]) -> None:
    """Every file of every source holds REPA features of `shape` (the network's group-1 tokens x projector width);
    ValueError naming the first source and file that lacks the column or holds another shape."""
    name = schema.REPA_FEATURES
    for source, uri in latents.items():
        for f in parquet_files(uri):
            s = _read_schema(f)
            if name not in s.names:
                raise ValueError(f"source {source!r} has no {name!r} column in {f!r}: a REPA stage needs DINOv2 "
                                 "patch features per row; set `encoders.repa` (e.g. dinov2-base) and precompute "
                                 "this source again into a fresh folder, or set objective.repa_weight: 0")
            got = schema.field_shape(s.field(name))
            if tuple(got) != tuple(shape):
                raise ValueError(f"source {source!r}: column {name!r} of {f!r} has shape {got}, but the network's "
                                 f"REPA target is {tuple(shape)} (group-1 tokens x repa_dim): precompute with a "
                                 "feature encoder whose patch grid and width match")
