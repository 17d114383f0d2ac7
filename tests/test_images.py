"""pipeline/core/images.py: every decode class ends as an RGB image or a typed skip reason; resize/crop numerics."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.core.images import SkipReason, decode_image, prepare, preprocess

RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring width x height RGB with a tiny (wrong) data stream: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def pixel(d, xy):
    return d.image.getpixel(xy)


def close(a, b, tol=12):
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b))


# ------------------------------------------------------------------------------------- skip reasons

def test_empty_and_random_bytes_are_skipped():
    assert decode_image(b"").reason == SkipReason.EMPTY
    rnd = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    d = decode_image(rnd)
    assert d.image is None and d.reason == SkipReason.NOT_AN_IMAGE == "not_an_image"
    assert decode_image(b"<html>404 not found</html>").reason == SkipReason.NOT_AN_IMAGE


def test_truncated_jpeg_is_corrupt():
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = encode(noisy, "JPEG", quality=90)
    assert decode_image(data).image is not None
    d = decode_image(data[: len(data) // 2])
    assert d.image is None and d.reason == SkipReason.CORRUPT


def test_png_with_bad_crc_is_corrupt():
    data = bytearray(encode(Image.new("RGB", (32, 32), RED), "PNG"))
    data[-20] ^= 0xFF  # inside the IDAT chunk: CRC mismatch
    assert decode_image(bytes(data)).reason == SkipReason.CORRUPT


def test_decompression_bomb_rejected_from_header():
    d = decode_image(png_header_only(10_000, 9_000))  # 90 M pixels declared, above the 64 M default
    assert d.image is None and d.reason == SkipReason.TOO_LARGE and (d.width, d.height) == (10_000, 9_000)
    # the configurable limit, below PIL's own
    d = decode_image(encode(Image.new("RGB", (100, 100), RED), "PNG"), max_pixels=5_000)
    assert d.reason == SkipReason.TOO_LARGE
    # PIL's hard limit (2x its MAX_IMAGE_PIXELS) still applies when ours is looser: too_large, not a crash
    assert decode_image(png_header_only(30_000, 30_000), max_pixels=10**12).reason == SkipReason.TOO_LARGE


def test_too_small_floor():
    data = encode(Image.new("RGB", (40, 90), RED), "PNG")
    assert decode_image(data, min_size=41).reason == SkipReason.TOO_SMALL
    assert decode_image(data, min_size=40).image.size == (40, 90)


# ------------------------------------------------------------------------------------ colour modes

def test_cmyk_jpeg_becomes_rgb():
    data = encode(Image.new("RGB", (32, 32), RED).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    d = decode_image(data)
    assert d.image.mode == "RGB" and close(pixel(d, (16, 16)), RED, 20)


def test_palette_png_with_transparency_composites_on_white():
    im = Image.new("P", (32, 32), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black (transparent), 1 red
    im.paste(1, (8, 8, 24, 24))
    data = encode(im, "PNG", transparency=0)
    assert Image.open(io.BytesIO(data)).mode == "P"
    d = decode_image(data)
    assert d.image.mode == "RGB"
    assert pixel(d, (0, 0)) == WHITE  # transparent black -> white, not black
    assert pixel(d, (16, 16)) == RED


def test_palette_png_without_transparency():
    im = Image.new("RGB", (16, 16), BLUE).quantize(colors=4)
    assert pixel(decode_image(encode(im, "PNG")), (3, 3)) == BLUE


def test_rgba_alpha_composited_on_white():
    a = np.zeros((8, 24, 4), np.uint8)
    a[..., 0] = 255  # red everywhere, alpha 0 / 128 / 255 in thirds
    a[:, 8:16, 3], a[:, 16:, 3] = 128, 255
    d = decode_image(encode(Image.fromarray(a, "RGBA"), "PNG"))
    assert pixel(d, (2, 4)) == WHITE
    assert close(pixel(d, (12, 4)), (255, 127, 127), 2)
    assert pixel(d, (20, 4)) == RED


def test_la_alpha_composited_on_white():
    a = np.zeros((8, 16, 2), np.uint8)  # black, transparent left half, opaque right half
    a[:, 8:, 1] = 255
    d = decode_image(encode(Image.fromarray(a, "LA"), "PNG"))
    assert pixel(d, (2, 2)) == WHITE and pixel(d, (12, 2)) == (0, 0, 0)


def test_grayscale_becomes_rgb():
    d = decode_image(encode(Image.new("L", (16, 16), 77), "JPEG", quality=95))
    assert d.image.mode == "RGB" and close(pixel(d, (8, 8)), (77, 77, 77), 2)
    d = decode_image(encode(Image.new("1", (16, 16), 1), "PNG"))
    assert pixel(d, (8, 8)) == WHITE


def test_16bit_png_scaled_to_8bit():
    ramp = (np.arange(64, dtype=np.uint16) * 1024).reshape(1, 64).repeat(8, 0)  # 0 .. 64512
    data = encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    d = decode_image(data)
    assert d.image.mode == "RGB"
    got = np.asarray(d.image)[0, :, 0].astype(int)
    assert np.abs(got - np.rint(ramp[0] / 257.0)).max() <= 1  # scaled, not clipped at 255
    assert got[-1] > 240 and got[0] == 0


def test_exif_orientation_applied():
    im = Image.new("RGB", (40, 20), RED)
    im.paste(BLUE, (20, 0, 40, 20))  # stored: left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display = rotate 90 degrees clockwise
    d = decode_image(encode(im, "JPEG", quality=95, exif=exif.tobytes()))
    assert d.image.size == (20, 40) and (d.width, d.height) == (20, 40)
    assert close(pixel(d, (10, 5)), RED, 30) and close(pixel(d, (10, 35)), BLUE, 30)


def test_gif_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in (GREEN, RED)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert close(pixel(decode_image(buf.getvalue()), (8, 8)), GREEN, 4)


# ------------------------------------------------------------------------------------- preprocessing

def test_preprocess_range_dtype_and_exact_values():
    a = preprocess(Image.new("RGB", (70, 50), (255, 0, 128)), 32)
    assert a.shape == (3, 32, 32) and a.dtype == np.float32 and a.flags["C_CONTIGUOUS"]
    assert np.allclose(a[0], 1.0) and np.allclose(a[1], -1.0) and np.allclose(a[2], 128 / 127.5 - 1, atol=1e-6)


def test_preprocess_resizes_short_side_and_keeps_center():
    im = Image.new("RGB", (300, 200), WHITE)  # landscape: short side 200 -> 100, width 150, crop 25 each side
    im.paste(RED, (0, 0, 40, 200))  # left stripe: cropped away (20 px after resize < 25)
    im.paste(BLUE, (260, 0, 300, 200))  # right stripe: cropped away
    im.paste(GREEN, (140, 90, 160, 110))  # center 20x20 -> 10x10 at the output center
    a = preprocess(im, 100)
    rgb = ((a.transpose(1, 2, 0) + 1) * 127.5).round().astype(int)
    assert close(rgb[50, 50], GREEN, 2)
    assert close(rgb[50, 0], WHITE, 2) and close(rgb[50, 99], WHITE, 2)  # no stripe left
    assert close(rgb[0, 0], WHITE, 2) and close(rgb[99, 99], WHITE, 2)
    green = (rgb[..., 1] > 200) & (rgb[..., 0] < 60)
    ys, xs = np.nonzero(green)
    assert abs(ys.mean() - 49.5) < 1 and abs(xs.mean() - 49.5) < 1 and 64 <= green.sum() <= 144


def test_preprocess_portrait_and_no_resize_at_exact_size():
    arr = np.random.default_rng(0).integers(0, 256, (80, 64, 3), dtype=np.uint8)  # portrait 64 x 80
    a = preprocess(Image.fromarray(arr), 64)  # short side already 64: a pure center crop
    expected = arr[8:72].astype(np.float32) / 127.5 - 1
    assert np.array_equal(a, expected.transpose(2, 0, 1))
    with pytest.raises(ValueError, match="RGB"):
        preprocess(Image.new("L", (8, 8)), 4)


def test_prepare_per_resolution_without_upsampling():
    data = encode(Image.new("RGB", (150, 100), RED), "PNG")
    p = prepare(data, [128, 64])
    assert p.reason is None and (p.width, p.height) == (150, 100)
    assert p.arrays[64].shape == (3, 64, 64) and p.arrays[128] is None and p.missing == [128]
    big = prepare(encode(Image.new("RGB", (130, 140), RED), "PNG"), [64, 128])
    assert big.missing == [] and big.arrays[128].shape == (3, 128, 128)


def test_prepare_skips_with_reason():
    small = encode(Image.new("RGB", (50, 50), RED), "PNG")
    p = prepare(small, [64, 128])
    assert p.reason == SkipReason.TOO_SMALL and p.missing == [64, 128]
    # a lower floor than every resolution still yields nothing usable: flagged too_small
    assert prepare(small, [64], min_size=32).reason == SkipReason.TOO_SMALL
    assert prepare(b"garbage", [64]).reason == SkipReason.NOT_AN_IMAGE
    with pytest.raises(ValueError, match="resolutions"):
        prepare(small, [])
