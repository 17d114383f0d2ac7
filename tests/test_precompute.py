"""Precompute: webdataset shards -> latent Parquet, through real Ray Data, on a local folder and moto S3."""
from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.core import schema, storage
from pipeline.core.images import prepare
from pipeline.data.precompute import (PrecomputeConfig, content_fingerprint, list_shards, precompute,
                                 precompute_locally, read_part_stats)
from pipeline.data.precompute_stages import EncodeImages

REPO = Path(__file__).resolve().parents[1]
RES = [64, 128]
LONG_CAPTION = " ".join(f"word{i}" for i in range(150))  # far past 77 tokens
TINY = dict(resolutions=RES, vae="standin", text_encoder="tiny", vae_batch_size=4, text_batch_size=8,
            spool_rows=16, decode_batch_rows=8, read_batch_rows=8, cpus_per_actor=0.5)


# ------------------------------------------------------------------------------------ test data


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def picture(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A smooth random picture (so crops differ by position) in the given mode."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    im = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    return im if mode == "RGB" else im.convert(mode)


def bomb_png(w: int = 40_000, h: int = 40_000) -> bytes:
    """A tiny PNG whose header declares w x h pixels (a decompression bomb)."""
    data = bytearray(_encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length + type
    data[ihdr:ihdr + 8] = struct.pack(">II", w, h)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


def sixteen_bit_png(w: int, h: int) -> bytes:
    a = (np.arange(w * h).reshape(h, w) * 37 % 65535).astype(np.uint16)
    return _encode(Image.fromarray(a), "PNG")


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A webdataset tar of (name, bytes) members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tf.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())


def sample(key: str, image: bytes | None, caption: bytes | None, ext: str = "jpg") -> list[tuple[str, bytes]]:
    out = []
    if image is not None:
        out.append((f"{key}.{ext}", image))
    if caption is not None:
        out.append((f"{key}.txt", caption))
    out.append((f"{key}.json", json.dumps({"key": key}).encode()))
    return out


def good_shard(shard: int, n: int) -> list[tuple[str, bytes]]:
    """n good samples; every third is too small for 128 px (latents_128 absent)."""
    members = []
    for i in range(n):
        size = (150, 100) if i % 3 == 0 else (200, 160)
        im = _encode(picture(*size, seed=shard * 100 + i), "JPEG", quality=90)
        members += sample(f"{shard:05d}{i:04d}", im, f"a picture number {i} of shard {shard}".encode())
    return members


# key -> (expected skip reason or None, expected handled flag or None)
BAD_CASES = {
    "truncated_jpeg": ("corrupt", None),
    "not_image": ("not_an_image", None),
    "empty_file": ("empty", None),
    "too_small": ("too_small", None),
    "bomb": ("too_large", None),
    "no_image": ("missing_image", None),
    "cmyk": (None, "mode_CMYK"),
    "palette": (None, "mode_P"),
    "sixteen": (None, "mode_I;16"),
    "alpha": (None, "mode_RGBA"),
    "empty_caption": (None, "empty_caption"),
    "no_caption": (None, "empty_caption"),
    "long_caption": (None, "caption_truncated"),
    "latin1_caption": (None, "caption_not_utf8"),
}


def bad_shard() -> list[tuple[str, bytes]]:
    good = _encode(picture(160, 140, seed=7), "JPEG", quality=90)
    m = []
    m += sample("truncated_jpeg", good[:len(good) // 2], b"cut jpeg")
    m += sample("not_image", b"<html>this is not an image</html>", b"html page")
    m += sample("empty_file", b"", b"empty file")
    m += sample("too_small", _encode(picture(40, 50, 1), "JPEG"), b"tiny")
    m += sample("bomb", bomb_png(), b"bomb", ext="png")
    m += sample("no_image", None, b"caption without image")
    m += sample("cmyk", _encode(picture(150, 130, 2, "CMYK"), "JPEG"), b"cmyk")
    m += sample("palette", _encode(picture(140, 140, 3, "P"), "PNG"), b"palette", ext="png")
    m += sample("sixteen", sixteen_bit_png(130, 150), b"sixteen bit", ext="png")
    m += sample("alpha", _encode(picture(140, 135, 4, "RGBA"), "PNG"), b"alpha", ext="png")
    m += sample("empty_caption", good, b"")
    m += sample("no_caption", good, None)
    m += sample("long_caption", good, LONG_CAPTION.encode())
    m += sample("latin1_caption", good, "café crème".encode("latin-1"))
    m += sample("cmyk", good, b"a second sample under an earlier key")  # duplicate key
    return m


N_GOOD = 6  # per good shard
N_GOOD_SHARDS = 3
TRUNC_KEPT = 3  # samples before the cut in the truncated archive


def make_shards(folder: Path) -> dict[str, int]:
    """Good shards, a shard of every bad-input class, and a truncated archive; returns samples per shard."""
    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for s in range(N_GOOD_SHARDS):
        write_tar(folder / f"{s:05d}.tar", good_shard(s, N_GOOD))
        counts[f"{s:05d}"] = N_GOOD
    bad = bad_shard()
    write_tar(folder / "00010.tar", bad)
    counts["00010"] = len(BAD_CASES) + 1
    write_tar(folder / "00011.tar", good_shard(11, TRUNC_KEPT + 1))
    with tarfile.open(folder / "00011.tar") as tf:
        last_image = [m for m in tf.getmembers() if m.name.endswith(".jpg")][-1]
    cut = last_image.offset_data + last_image.size // 2  # inside the last sample's image
    (folder / "00011.tar").write_bytes((folder / "00011.tar").read_bytes()[:cut])
    counts["00011"] = TRUNC_KEPT  # the cut sample is lost with the archive's tail: reported as a shard error
    write_tar(folder / "00012.tar", [])  # an empty shard still gets its (empty) part file
    counts["00012"] = 0
    (folder / "_SUCCESS").write_bytes(b"")
    (folder / "00000.parquet").write_bytes(b"img2dataset's own per-shard table: not read")
    return counts


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    folder = tmp_path_factory.mktemp("data") / "synthetic"
    return folder, make_shards(folder)


def read_parts(uri: str) -> dict[str, pa.Table]:
    fs, path = storage.filesystem(uri)
    return {Path(p).name: pq.read_table(p.removeprefix("s3://") if storage.is_s3(p) else p, filesystem=fs)
            for p in storage.list_files(uri, ".parquet")}


# ----------------------------------------------------------------------------- unit: no Ray


def test_config_is_strict_and_checked(tmp_path):
    with pytest.raises(ValueError, match="resolutoins"):
        PrecomputeConfig.model_validate({"resolutoins": [256]})
    with pytest.raises(ValueError, match="empty_captions"):
        PrecomputeConfig(empty_captions="drop")
    with pytest.raises(ValueError, match="dtype"):
        PrecomputeConfig(dtype="fp8")
    assert PrecomputeConfig(resolutions=[512, 256, 512]).resolutions == [256, 512]
    with pytest.raises(FileNotFoundError, match="_SUCCESS"):
        list_shards(str(tmp_path))
    (tmp_path / "_SUCCESS").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no \.tar shards"):
        list_shards(str(tmp_path))


def run_stages_in_process(tar: Path, out: Path, cfg: PrecomputeConfig) -> pa.Table:
    """The Ray Data stages applied in this process to one shard, then committed: the same code without Ray."""
    precompute_locally({tar.stem: str(tar)}, str(out), cfg, "src")
    return pq.read_table(str(out / f"part-{tar.stem}.parquet"))


def test_every_bad_input_class_is_a_counted_skip_or_handled(shards, tmp_path):
    folder, _ = shards
    cfg = PrecomputeConfig(**TINY)
    table = run_stages_in_process(folder / "00010.tar", tmp_path, cfg)
    stats = read_part_stats(str(tmp_path / "part-00010.parquet"))
    kept = {k.split("/", 1)[1]: i for i, k in enumerate(table.column("key").to_pylist())}
    expect_skips = {}
    for key, (reason, flag) in BAD_CASES.items():
        if reason:
            assert key not in kept, key
            expect_skips[reason] = expect_skips.get(reason, 0) + 1
        else:
            assert key in kept, key
            assert stats["handled"].get(flag, 0) >= 1, (key, flag, stats["handled"])
    expect_skips["duplicate_key"] = 1
    assert stats["skipped"] == expect_skips
    assert stats["rows"] == table.num_rows == len(BAD_CASES) + 1 - sum(expect_skips.values())
    assert stats["handled"]["empty_caption"] == 2
    assert not list((tmp_path / "_spool").rglob("*.parquet")), "spools are deleted once committed"
    rows = table.to_pylist()
    caption = {r["key"].split("/", 1)[1]: (r["caption"], r["caption_truncated"]) for r in rows}
    assert caption["long_caption"] == (LONG_CAPTION, True)  # full text kept, flagged
    assert caption["latin1_caption"][0] == "caf\ufffd cr\ufffdme" and not caption["latin1_caption"][1]
    assert caption["empty_caption"] == ("", False) and caption["no_caption"] == ("", False)
    assert caption["cmyk"][0] == "cmyk"  # the first sample of a key wins; the later duplicate is skipped
    # Converted modes give real pictures: the 16-bit gradient is not flat, the alpha image is composited.
    lat = schema.read_tensor(table, "latents_64")
    assert lat[kept["sixteen"]].std() > 0.05 and np.isfinite(lat[kept["alpha"]]).all()


def test_rows_hold_the_right_latents_and_high_res_is_absent_and_flagged(shards, tmp_path):
    import torch

    from model.encoders import load_text_encoder, load_vae

    folder, _ = shards
    cfg = PrecomputeConfig(**TINY)
    table = run_stages_in_process(folder / "00001.tar", tmp_path, cfg)
    assert table.num_rows == N_GOOD
    schema.validate(table.schema, RES)
    with tarfile.open(folder / "00001.tar") as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    vae, text = load_vae("standin"), load_text_encoder("tiny")
    lat = {r: schema.read_tensor(table, schema.latent_column(r)) for r in RES}  # (N, 4, R/4, R/4)
    states = schema.read_tensor(table, schema.CAPTION_STATES)  # (N, 77, 64)
    assert states.shape == (N_GOOD, 77, 64) and lat[64].shape == (N_GOOD, 4, 16, 16)
    for i, row in enumerate(table.select(["key", "caption", "width", "height", "has_64", "has_128"]).to_pylist()):
        key = row["key"].split("/", 1)[1]
        prep = prepare(members[f"{key}.jpg"], RES)
        assert (row["width"], row["height"]) == (prep.width, prep.height)
        assert row["caption"] == members[f"{key}.txt"].decode()
        for r in RES:
            if prep.arrays[r] is None:  # short side 100 < 128: null latents, has_128 False, never upsampled
                assert row[f"has_{r}"] is False and np.isnan(lat[r][i]).all()
                continue
            assert row[f"has_{r}"] is True
            want = vae.encode(torch.from_numpy(prep.arrays[r][None]))[0].numpy()
            np.testing.assert_array_equal(lat[r][i], want.astype(np.float16).astype(np.float32))
        np.testing.assert_allclose(states[i], text.encode([row["caption"]])[0].numpy(), atol=2e-2)
    assert sum(not h for h in table.column("has_128").to_pylist()) == N_GOOD // 3
    assert table.column("latents_128").null_count == N_GOOD // 3
    assert table.column("latents_64").null_count == 0


def test_empty_captions_can_be_counted_skips(shards, tmp_path):
    folder, _ = shards
    table = run_stages_in_process(folder / "00010.tar", tmp_path, PrecomputeConfig(**TINY, empty_captions="skip"))
    stats = read_part_stats(str(tmp_path / "part-00010.parquet"))
    assert stats["skipped"]["empty_caption"] == 2 and "empty_caption" not in stats["handled"]
    assert not {"src/empty_caption", "src/no_caption"} & set(table.column("key").to_pylist())


def test_posterior_sample_is_per_row_deterministic(tmp_path):
    from model.encoders.sdxl_vae import save_tiny_vae

    rng = np.random.default_rng(0)
    n = 6
    pixels = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    keys = np.array([f"k{i}" for i in range(n)], object)

    def encode(rows, seed=0):
        batch = {"key": keys[rows], "pixels_32": pixels[rows], "has_32": np.ones(len(rows), bool),
                 "is_end": np.zeros(len(rows), bool), "reason": np.array([""] * len(rows), object)}
        vae = EncodeImages(save_tiny_vae(tmp_path / "vae"), [32], 4, "cpu", "float32", seed)
        return vae(batch)["latents_32"]  # (len(rows), 4, 8, 8) float16

    all_rows = encode(np.arange(n))
    assert np.isfinite(all_rows).all() and all_rows.std() > 0
    shuffled = encode(np.array([5, 2, 0]))  # other batch, other neighbours, other padding
    np.testing.assert_array_equal(shuffled, all_rows[[5, 2, 0]])
    assert not np.array_equal(encode(np.arange(n), seed=1), all_rows)  # the sample really is random


# ----------------------------------------------------------------------------- through Ray


def check_output(out_uri: str, counts: dict[str, int], report: dict) -> dict[str, pa.Table]:
    parts = read_parts(out_uri)
    assert sorted(parts) == sorted(f"part-{s}.parquet" for s in counts)
    keys = [k for t in parts.values() for k in t.column("key").to_pylist()]
    assert len(keys) == len(set(keys)), "no row twice"
    skipped_bad = len([c for c in BAD_CASES.values() if c[0]]) + 1  # + the duplicate key
    n_good = N_GOOD_SHARDS * N_GOOD + (len(BAD_CASES) + 1 - skipped_bad) + TRUNC_KEPT
    assert len(keys) == report["rows_written"] == n_good
    assert report["samples_seen"] == sum(counts.values())
    assert report["samples_seen"] == report["rows_written"] + sum(report["skipped"].values())
    assert report["skipped"]["missing_image"] == 1
    assert set(report["shards"]["errors"]) == {"00011"}
    assert parts["part-00012.parquet"].num_rows == 0
    for t in parts.values():
        schema.validate(t.schema, RES)
        assert schema.read_tensor(t, "caption_states").shape == (t.num_rows, 77, 64)
        assert schema.read_tensor(t, "latents_128").shape == (t.num_rows, 4, 32, 32)
        assert t.column("key").to_pylist() == sorted(t.column("key").to_pylist())
        assert all(k.startswith("synthetic/") for k in t.column("key").to_pylist())
    for name in ("_SUCCESS", "_report.json"):
        assert storage.exists(storage.join(out_uri, name))
    assert not storage.list_files(storage.join(out_uri, "_spool"), recursive=True)
    return parts


@pytest.fixture(scope="module")
def clean_run(shards, ray_address, tmp_path_factory):
    """One uninterrupted local run: (output folder, report)."""
    import ray

    folder, _ = shards
    out = tmp_path_factory.mktemp("clean") / "latents"
    try:
        report = precompute(str(folder), str(out), PrecomputeConfig(**TINY), ray_address=ray_address)
    finally:
        ray.shutdown()
    return out, report


@pytest.mark.slow
def test_shards_to_parquet_locally(shards, clean_run):
    _, counts = shards
    out, report = clean_run
    check_output(str(out), counts, report)
    assert report["shards"] == {"total": len(counts), "processed": len(counts), "already_done": 0,
                                "errors": report["shards"]["errors"]}
    assert report["handled"]["absent_128"] >= N_GOOD_SHARDS * N_GOOD // 3
    assert report["device"] == "cpu" and report["dtype"] == "float32"
    # A rerun after _SUCCESS returns the stored report without touching Ray or the parts.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert precompute(str(shards[0]), str(out), PrecomputeConfig(**TINY)) == report
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    with pytest.raises(ValueError, match="seed"):
        precompute(str(shards[0]), str(out), PrecomputeConfig(**{**TINY, "seed": 1}))


KILL_DRIVER = """
import json, sys, time
from pipeline.data import precompute as P
committed = P._on_shard_committed
def stall(stats):  # hold the driver after its first commit, so the test kills it mid-run
    committed(stats)
    time.sleep(600)
P._on_shard_committed = stall
P.precompute(sys.argv[1], sys.argv[2], P.PrecomputeConfig(**json.loads(sys.argv[3])))
"""


def run_and_kill_after_first_commit(src: str, out: str, cfg: dict, env: dict, tmp_path: Path) -> None:
    """Run precompute in a subprocess; SIGKILL its process group once a part file is committed."""
    script = tmp_path / "driver.py"
    script.write_text(KILL_DRIVER)
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen([sys.executable, str(script), src, out, json.dumps(cfg)], cwd=REPO,
                            env=dict(env, PYTHONPATH=str(REPO)), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not storage.list_files(out, ".parquet"):
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no part file committed in time"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()


@pytest.mark.slow
def test_killed_run_on_s3_resumes_without_loss_or_duplicates(shards, clean_run, ray_address, s3_bucket,
                                                               s3_endpoint, monkeypatch, tmp_path):
    import ray

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)  # before connecting: Ray workers get it from connect()
    folder, counts = shards
    src = f"s3://{s3_bucket}/data/shards/synthetic"
    for p in folder.iterdir():
        storage.write_bytes(storage.join(src, p.name), p.read_bytes())
    out = f"s3://{s3_bucket}/data/latents/synthetic"
    # max_commits_in_flight=1: the stalled driver has committed exactly one part when it is killed.
    env = dict(os.environ, RAY_ADDRESS=ray_address)
    run_and_kill_after_first_commit(src, out, {**TINY, "max_commits_in_flight": 1}, env, tmp_path)
    committed = [p.rsplit("/", 1)[1] for p in storage.list_files(out, ".parquet")]
    assert len(committed) == 1 and not storage.exists(storage.join(out, "_SUCCESS"))
    first = read_parts(out)[committed[0]]
    fs, path = storage.filesystem(out)
    assert pq.read_table(path, filesystem=fs).num_rows == first.num_rows, "only committed rows are visible"
    try:
        report = precompute(src, out, PrecomputeConfig(**TINY), ray_address=ray_address)
    finally:
        ray.shutdown()
    assert report["shards"]["already_done"] == 1 and report["shards"]["processed"] == len(counts) - 1
    parts = check_output(out, counts, report)
    assert parts[committed[0]].equals(first), "a committed part is never rewritten"
    clean = read_parts(str(clean_run[0]))
    assert sorted(clean) == sorted(parts)
    for name, table in clean.items():
        assert parts[name].equals(table), f"{name} differs from the uninterrupted local run"
    assert report["skipped"] == clean_run[1]["skipped"] and report["handled"] == clean_run[1]["handled"]
    dataset = pq.read_table(path, filesystem=fs)  # the whole folder with plain pyarrow: markers ignored
    assert dataset.num_rows == report["rows_written"]
    assert content_fingerprint(PrecomputeConfig(**TINY), "synthetic") == report["fingerprint"]


def test_decode_stage_skips_a_valid_bomb_before_decoding():
    """A real, decodable PNG (not only a lying header) over max_pixels is a counted too_large skip, decoded never."""
    import resource

    from pipeline.data.precompute_stages import DecodeImages

    w, h = 4000, 3000  # 12 M pixels, a few KB on disk
    co = zlib.compressobj(1)
    idat = b"".join(co.compress(b"\0" * (w + 1)) for _ in range(h)) + co.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    assert Image.open(io.BytesIO(png)).size == (w, h) and len(png) < 100_000
    row = {"shard": ["s"], "seq": [0], "key": ["k"], "is_end": [False], "total": [-1], "error": [""], "reason": [""],
           "caption_raw": [b"a bomb"], "has_caption": [True], "image": [png]}
    batch = {k: np.array(v, dtype=object if isinstance(v[0], (str, bytes)) else None) for k, v in row.items()}
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic()
    out = DecodeImages([64], None, 1_000_000, "keep")(batch)
    assert list(out["reason"]) == ["too_large"] and not out["has_64"][0]
    assert time.monotonic() - start < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 8 * 1024  # KiB: 12 M pixels not decoded


@pytest.mark.parametrize("damage", ["truncated", "zero_bytes"])
def test_damaged_part_on_rerun_is_named(tmp_path, damage):
    """Reliability item 6: a rerun that meets a damaged part names it instead of a bare pyarrow error."""
    part = tmp_path / "part-00007.parquet"
    pq.write_table(pa.table({"x": [1, 2, 3]}), part)
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    with pytest.raises(ValueError, match=r"part-00007.parquet.*not a readable Parquet file"):
        read_part_stats(str(part))
