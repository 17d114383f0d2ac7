"""E-MMDiT precompute: DC-AE latents (deterministic), Llama caption states in both text modes, the unconditional
file."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from model.encoders import load_text_encoder, load_vae
from pipeline.core import schema
from pipeline.data.precompute import PrecomputeConfig, precompute_locally
from test_precompute import _encode, picture, sample, write_tar

CAPTIONS = ["a large red circle on a white background, center", "", "blue " * 40, "a dog"]
EMMDIT_TINY = dict(resolutions=[32], vae="tiny-dcae", text_encoder="tiny-llama", max_caption_tokens=16,
                   vae_batch_size=4, text_batch_size=4, spool_rows=16, decode_batch_rows=8, read_batch_rows=8,
                   min_side=32)


def _precompute(tmp, mode: str):
    members = []
    for i, cap in enumerate(CAPTIONS):
        members += sample(f"{i:05d}", _encode(picture(48, 40, seed=i), "JPEG", quality=90), cap.encode())
    tar = tmp / "00000.tar"
    write_tar(tar, members)
    out = tmp / "latents"
    precompute_locally({"00000": str(tar)}, str(out), PrecomputeConfig(**EMMDIT_TINY, text_mode=mode), "src")
    return out, pq.read_table(str(out / "part-00000.parquet"))


@pytest.fixture(scope="module")
def part(tmp_path_factory):
    """The release's text mode (the default): every row of every caption stored."""
    return _precompute(tmp_path_factory.mktemp("emmdit_pre"), "release")


@pytest.fixture(scope="module")
def compact_part(tmp_path_factory):
    return _precompute(tmp_path_factory.mktemp("emmdit_pre_compact"), "compact")


def test_release_mode_stores_the_release_states_of_every_row(part):
    from model.pipelines.emmdit import encode_llama

    out, table = part
    field = table.schema.field(schema.CAPTION_STATES)
    assert not schema.is_compact(field) and schema.field_shape(field) == (16, 64)
    enc = load_text_encoder("tiny-llama")
    captions = table.column("caption").to_pylist()
    # the release's procedure: cleaned captions, masked Llama, all rows (model/pipelines/emmdit.py)
    want = encode_llama(enc.tokenizer, enc.model, captions, 16, "release", clean_caption=True)[0]
    got = schema.read_tensor(table, schema.CAPTION_STATES, dtype=np.float16)
    assert np.array_equal(got, want.numpy().astype(np.float16))
    pads = [r for r, n in zip(got, encode_llama(enc.tokenizer, enc.model, captions, 16)[1]) if n < 16]
    assert len({p[-1].tobytes() for p in pads}) > 1  # pad rows depend on the caption, as the release's do
    uncond = schema.read_unconditional(str(out))
    assert np.allclose(uncond, enc.unconditional().numpy()) and schema.stored_text_mode(str(out)) == "release"
    assert table.column("caption_truncated").to_pylist() == [len(c.split()) + 1 > 16 for c in captions]


def test_compact_states_repad_to_the_encoders_full_states(compact_part):
    from model.pipelines.emmdit import compact_ids

    out, table = compact_part
    field = table.schema.field(schema.CAPTION_STATES)
    assert schema.is_compact(field) and schema.field_shape(field) == (16, 64)
    enc = load_text_encoder("tiny-llama", mode="compact")
    captions = table.column("caption").to_pylist()
    full = enc.encode(captions).numpy().astype(np.float16)  # (N, 16, 64)
    got = schema.read_tensor(table, schema.CAPTION_STATES, dtype=np.float16)
    assert got.shape == full.shape and np.array_equal(got, full)
    lengths = schema.compact_lengths(table.column(schema.CAPTION_STATES).combine_chunks(), field)
    assert sorted(lengths.tolist()) == sorted(compact_ids(enc.tokenizer, captions, 16)[1].tolist())
    assert table.column("caption_truncated").to_pylist() == [len(c.split()) + 1 > 16 for c in captions]
    assert schema.stored_text_mode(str(out)) == "compact"
    assert np.allclose(schema.read_unconditional(str(out)), enc.unconditional().numpy())


def test_text_mode_is_part_of_a_llama_fingerprint_only():
    from pipeline.data.precompute import content_fingerprint

    cfg = PrecomputeConfig(**EMMDIT_TINY)
    assert content_fingerprint(cfg, "src")["text_mode"] == "release"
    assert content_fingerprint(cfg.model_copy(update={"text_mode": "compact"}), "src")["text_mode"] == "compact"
    assert "text_mode" not in content_fingerprint(cfg.model_copy(update={"text_encoder": "tiny"}), "src")


def test_unconditional_file_and_latents(part):
    out, table = part
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
    assert per_c == 20 * width * 2 + 8  # the caption's rows plus an 8-byte offset (large_binary)


@pytest.fixture(scope="module")
def repa_part(tmp_path_factory):
    """Two resolutions, one image too small for the larger: its features come from its 32-px crop."""
    tmp = tmp_path_factory.mktemp("emmdit_repa")
    members, images = [], [_encode(picture(w, h, seed=i), "PNG") for i, (w, h) in
                           enumerate([(80, 72), (48, 40), (96, 64)])]
    for i, data in enumerate(images):
        members += sample(f"{i:05d}", data, CAPTIONS[0].encode(), ext="png")
    tar = tmp / "00000.tar"
    write_tar(tar, members)
    out = tmp / "latents"
    cfg = PrecomputeConfig(**{**EMMDIT_TINY, "resolutions": [32, 64], "repa": "tiny-dinov2", "repa_batch_size": 2})
    precompute_locally({"00000": str(tar)}, str(out), cfg, "src")
    return images, cfg, pq.read_table(str(out / "part-00000.parquet"))


def test_repa_features_are_dinov2_of_the_largest_crop(repa_part):
    from model.encoders import load_repa_encoder
    from pipeline.core.images import prepare

    images, cfg, table = repa_part
    field = table.schema.field(schema.REPA_FEATURES)
    assert schema.field_shape(field) == (256, 32)  # EMMDiT_Debug's group-1 tokens x repa_dim
    feats = schema.read_tensor(table, schema.REPA_FEATURES)
    assert feats.shape == (3, 256, 32) and np.isfinite(feats).all()
    assert table.column("has_64").to_pylist() == [True, False, True]
    enc = load_repa_encoder("tiny-dinov2")
    for i, data in enumerate(images):  # rows are in key order, as the images were written
        prep = prepare(data, [32, 64])
        crop = prep.arrays[64] if prep.arrays[64] is not None else prep.arrays[32]
        want = enc.encode(torch.from_numpy(crop[None])).numpy().astype(np.float16)[0]
        np.testing.assert_allclose(feats[i], want.astype(np.float32), atol=2e-3, rtol=2e-3)
    bytes_per_row = table.column(schema.REPA_FEATURES).nbytes / table.num_rows
    assert bytes_per_row == 256 * 32 * 2


def test_repa_encoder_is_part_of_the_fingerprint(repa_part):
    from pipeline.data.precompute import content_fingerprint

    _, cfg, _ = repa_part
    assert content_fingerprint(cfg, "src")["repa"] == "tiny-dinov2"
    assert "repa" not in content_fingerprint(cfg.model_copy(update={"repa": None}), "src")


def test_repa_features_at_dinov2_base_size():
    """Bytes a row at the paper's shape: 256 patch tokens x 768, float16."""
    field = schema.latent_schema([512], 32, 32, 128, 2048, np.zeros(2048, np.float16), (256, 768)).field(
        schema.REPA_FEATURES)
    arr = schema.tensor_array([np.zeros((256, 768), np.float16)] * 2, field)
    assert arr.nbytes / 2 == 256 * 768 * 2  # 384 KiB
