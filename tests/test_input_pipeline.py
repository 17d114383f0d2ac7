"""DecodeLatents' fast path: batches equal plain pyarrow reads of the same rows, with and without dropped rows."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.core import schema
from pipeline.train.data import DecodeLatents


def _table(has: list[bool]) -> pa.Table:
    s = schema.latent_schema([64], 4, 8, 7, 16)
    rng = np.random.default_rng(0)
    n = len(has)
    lat = [rng.standard_normal((4, 8, 8)).astype(np.float16) if h else None for h in has]
    caps = list(rng.standard_normal((n, 7, 16)).astype(np.float16))
    fields = [s.field("latents_64"), s.field("has_64"), s.field("caption_states")]
    table = pa.table({"latents_64": schema.tensor_array(lat, fields[0]), "has_64": pa.array(has),
                      "caption_states": schema.tensor_array(caps, fields[2])}, schema=pa.schema(fields))
    # Two chunks, as Ray hands a block read from two row groups.
    return pa.concat_tables([table.slice(0, n // 2), table.slice(n // 2)])


@pytest.mark.parametrize("has", [[True] * 6, [True, False, True, True, False, True]])
def test_decoded_batches_equal_a_plain_read(has):
    table = _table(has)
    out = DecodeLatents(64, (4, 8, 8), (7, 16))(table)
    keep = np.array(has)
    want_lat = schema.read_tensor(table, "latents_64", np.float16)[keep]
    want_cap = schema.read_tensor(table, "caption_states", np.float16)[keep]
    assert out["latents"].dtype == np.float16 and out["latents"].shape == (keep.sum(), 4, 8, 8)
    np.testing.assert_array_equal(out["latents"], want_lat)
    np.testing.assert_array_equal(out["caption"], want_cap)
