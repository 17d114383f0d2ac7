"""E-MMDiT precompute: DC-AE latents (deterministic), compact Llama caption states, the unconditional file."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from model.encoders import load_text_encoder, load_vae
from pipeline.core import schema
from pipeline.data.precompute import PrecomputeConfig, precompute_locally
from test_precompute import _encode, picture, sample, write_tar

CAPTIONS = ["a large red circle on a white background, center", "", "blue " * 40, "a dog"]
EMMDIT_TINY = dict(resolutions=[32], vae="tiny-dcae", text_encoder="tiny-llama", max_caption_tokens=16,
                   vae_batch_size=4, text_batch_size=4, spool_rows=16, decode_batch_rows=8, read_batch_rows=8,
                   min_side=32)


@pytest.fixture(scope="module")
def part(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("emmdit_pre")
    members = []
    for i, cap in enumerate(CAPTIONS):
        members += sample(f"{i:05d}", _encode(picture(48, 40, seed=i), "JPEG", quality=90), cap.encode())
    tar = tmp / "00000.tar"
    write_tar(tar, members)
    out = tmp / "latents"
    precompute_locally({"00000": str(tar)}, str(out), PrecomputeConfig(**EMMDIT_TINY), "src")
    return out, pq.read_table(str(out / "part-00000.parquet"))


def test_compact_states_repad_to_the_encoders_full_states(part):
    out, table = part
    field = table.schema.field(schema.CAPTION_STATES)
    assert schema.is_compact(field) and schema.field_shape(field) == (16, 64)
    enc = load_text_encoder("tiny-llama")
    captions = table.column("caption").to_pylist()
    full = enc.encode(captions).numpy().astype(np.float16)  # (N, 16, 64)
    got = schema.read_tensor(table, schema.CAPTION_STATES, dtype=np.float16)
    assert got.shape == full.shape and np.array_equal(got, full)
    lengths = table.column(schema.CAPTION_STATES).combine_chunks().value_lengths().to_numpy() // 64
    assert sorted(lengths.tolist()) == sorted(enc.tokenize(captions)[1].tolist())
    assert table.column("caption_truncated").to_pylist() == [len(c.split()) + 1 > 16 for c in captions]


def test_unconditional_file_and_latents(part):
    out, table = part
    uncond = schema.read_unconditional(str(out))
    enc = load_text_encoder("tiny-llama")
    assert uncond.shape == (16, 64) and np.allclose(uncond, enc.unconditional().numpy())
    assert schema.read_unconditional(str(out / "missing")) is None
    lat = schema.read_tensor(table, "latents_32")  # (N, 4, 8, 8), deterministic DC-AE encode x scaling
    assert lat.shape == (len(CAPTIONS), 4, 8, 8)
    vae = load_vae("tiny-dcae")
    assert vae.scaling_factor == 0.41407 and np.isfinite(lat).all()


def test_compact_bytes_per_row_against_full():
    """Bytes of one caption's states, compact vs the full fixed-size column, at Llama-3.2-1B's 128 x 2048."""
    tokens, width = 128, 2048
    pad = np.zeros(width, np.float16)
    compact = schema.compact_tensor_field(schema.CAPTION_STATES, (tokens, width), pad)
    full = schema.tensor_field(schema.CAPTION_STATES, (tokens, width))
    rows = [np.zeros((tokens, width), np.float16) for _ in range(4)]
    lengths = [20, 20, 20, 20]  # a typical short caption: BOS + 19 tokens
    c = schema.compact_array(rows, lengths, compact)
    f = schema.tensor_array(rows, full)
    per_c, per_f = c.nbytes / 4, f.nbytes / 4
    assert per_f == tokens * width * 2  # 512 KiB
    assert per_c == 20 * width * 2 + 4  # the caption's rows plus a 4-byte offset
