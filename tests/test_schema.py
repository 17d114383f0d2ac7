"""The latent-row schema: float16 tensors as raw bytes, read back exactly through Parquet; files written with the
earlier list columns still read; a column whose type cannot hold its shape is named."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core import schema


def through_parquet(table: pa.Table) -> pa.Table:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=3)  # several row groups: chunked columns on read
    return pq.read_table(pa.BufferReader(buf.getvalue()))


def legacy_field(field: pa.Field) -> pa.Field:
    """The same column as the list layout files had before the byte layout."""
    size = int(np.prod(schema.field_shape(field)))
    kind = pa.list_(pa.float16()) if schema.is_compact(field) else pa.list_(pa.float16(), size)
    return pa.field(field.name, kind, nullable=field.nullable, metadata=field.metadata)


@pytest.fixture
def rows():
    rng = np.random.default_rng(0)
    lat = [rng.standard_normal((4, 8, 8)).astype(np.float16) for _ in range(7)]
    lat[2] = lat[5] = None  # images too small for this resolution
    caps = [rng.standard_normal((16, 8)).astype(np.float16) for _ in range(7)]
    lengths = [1, 16, 3, 7, 2, 9, 5]
    pad = rng.standard_normal(8).astype(np.float16)
    for c, n in zip(caps, lengths):
        c[n:] = pad  # what a text tower gives: pad rows after the caption's own
    s = schema.latent_schema([32], 4, 4, 16, 8, text_pad=pad)
    return s, lat, caps, lengths


def test_tensors_round_trip_through_parquet_as_bytes(rows):
    s, lat, caps, lengths = rows
    lat_field, cap_field = s.field("latents_32"), s.field(schema.CAPTION_STATES)
    assert lat_field.type == pa.binary(4 * 8 * 8 * 2) and cap_field.type == pa.large_binary()
    table = through_parquet(pa.table({"latents_32": schema.tensor_array(lat, lat_field),
                                      schema.CAPTION_STATES: schema.compact_array(caps, lengths, cap_field)},
                                     schema=pa.schema([lat_field, cap_field])))
    got = schema.read_tensor(table, "latents_32", np.float16)
    for want, row in zip(lat, got):
        assert np.isnan(row).all() if want is None else np.array_equal(row, want)
    assert np.array_equal(schema.read_tensor(table, schema.CAPTION_STATES, np.float16), np.stack(caps))
    col = table.column(schema.CAPTION_STATES).combine_chunks()
    assert schema.compact_lengths(col, cap_field).tolist() == lengths
    assert col.nbytes < sum(lengths) * 8 * 2 + 8 * 8  # only the caption's own rows (+ offsets) are stored


def test_a_slice_decodes_its_own_rows(rows):
    """Ray hands a stage slices of a block: the decoders must honour an array's offset."""
    s, lat, caps, lengths = rows
    lat = [np.zeros((4, 8, 8), np.float16) if v is None else v for v in lat]
    arr = schema.tensor_array(lat, s.field("latents_32"))
    assert np.array_equal(schema.flat_values(arr.slice(3, 2), 256).reshape(2, 4, 8, 8), np.stack(lat[3:5]))
    cap_field = s.field(schema.CAPTION_STATES)
    compact = schema.compact_array(caps, lengths, cap_field)
    assert np.array_equal(schema.repad(compact.slice(2, 3), cap_field, np.float16), np.stack(caps[2:5]))


def test_files_written_with_list_columns_still_read(rows):
    s, lat, caps, lengths = rows
    lat_field, cap_field = s.field("latents_32"), s.field(schema.CAPTION_STATES)
    old_lat = pa.array([None if v is None else v.reshape(-1) for v in lat], legacy_field(lat_field).type)
    old_cap = pa.array([c[:n].reshape(-1) for c, n in zip(caps, lengths)], legacy_field(cap_field).type)
    table = through_parquet(pa.table({"latents_32": old_lat, schema.CAPTION_STATES: old_cap},
                                     schema=pa.schema([legacy_field(lat_field), legacy_field(cap_field)])))
    got = schema.read_tensor(table, "latents_32", np.float16)
    for want, row in zip(lat, got):
        assert np.isnan(row).all() if want is None else np.array_equal(row, want)
    assert np.array_equal(schema.read_tensor(table, schema.CAPTION_STATES, np.float16), np.stack(caps))
    legacy = s
    for f in (lat_field, cap_field):
        legacy = legacy.set(legacy.get_field_index(f.name), legacy_field(f))
    schema.validate(legacy, [32])  # a legacy schema is valid


def test_a_column_too_small_for_its_shape_is_named(rows):
    s = rows[0]
    wrong = pa.field("latents_32", pa.binary(100), metadata=s.field("latents_32").metadata)
    bad = s.set(s.get_field_index("latents_32"), wrong)
    with pytest.raises(ValueError, match=r"column 'latents_32' has type fixed_size_binary\[100\].*\[4, 8, 8\]"):
        schema.validate(bad, [32])
    with pytest.raises(ValueError, match="expected 256 float16 values"):
        schema.flat_values(pa.array([b"\0" * 100], pa.binary(100)), 256)
