"""pipeline/data/shapes.py: rendering, captions, dataset files and the loopback server with opt-out headers."""
from __future__ import annotations

import collections
import io
import socket
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.core.images import SkipReason, decode_image, prepare
from pipeline.data.shapes import (
    BACKGROUNDS, BAD_KINDS, COLOURS, ShapeSpec, all_specs, load_synthetic_dataset, parse_caption, render,
    render_array, serve_folder, write_synthetic_dataset,
)


def fetch(url: str):
    """(status, body, headers) of a GET."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, b"", e.headers


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("syn") / "ds", 36, size=64, seed=3,
                                   bad_fraction=1 / 3, opt_out_fraction=1 / 6)


# ------------------------------------------------------------------------------------------ render

def test_render_places_colour_shape_and_background():
    spec = ShapeSpec("red", "circle", "black", "top left", "large")
    a = np.asarray(render(spec, 100))
    assert a.shape == (100, 100, 3)
    assert tuple(a[27, 27]) == COLOURS["red"]  # shape centre at 0.27 of the side
    assert tuple(a[2, 2]) == BACKGROUNDS["black"] and tuple(a[73, 73]) == BACKGROUNDS["black"]
    assert tuple(a[27, 73]) == BACKGROUNDS["black"] and tuple(a[73, 27]) == BACKGROUNDS["black"]
    assert np.array_equal(a, np.asarray(render(spec, 100)))  # pure


def test_render_array_matches_preprocessed_render():
    spec = ShapeSpec("orange", "triangle", "gray", "center", "large")
    a = render_array(spec, 32)
    assert a.shape == (3, 32, 32) and a.dtype == np.float32
    assert np.array_equal(a, prepare(png_bytes(render(spec, 32)), [32]).arrays[32])


def png_bytes(im):
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def test_shapes_differ_and_sizes_scale():
    areas = {}
    for shape in ("circle", "square", "triangle"):
        for size in ("small", "large"):
            a = np.asarray(render(ShapeSpec("blue", shape, "white", "center", size), 96))
            areas[shape, size] = int((np.abs(a.astype(int) - COLOURS["blue"]).sum(-1) < 30).sum())
    for shape in ("circle", "square", "triangle"):
        assert areas[shape, "large"] > 2.5 * areas[shape, "small"]
    assert len({areas[s, "large"] for s in ("circle", "square", "triangle")}) == 3
    tri = np.asarray(render(ShapeSpec("blue", "triangle", "white", "center", "large"), 96))
    blue = np.abs(tri.astype(int) - COLOURS["blue"]).sum(-1) < 30
    assert blue[40].sum() < blue[60].sum()  # pointing up: wider at the bottom


def test_non_square_render_keeps_shape_in_the_center_crop():
    spec = ShapeSpec("green", "square", "gray", "bottom right", "small")
    wide = np.asarray(render(spec, 150, 100))[:, 25:125]  # the center crop the precompute takes
    square = np.asarray(render(spec, 100, 100))
    assert np.abs(wide.astype(int) - square.astype(int)).max() <= 2


def test_captions_roundtrip_and_errors():
    specs = all_specs()
    assert len(specs) == len(set(specs)) == 6 * 3 * 3 * 5 * 2
    assert all(parse_caption(s.caption) == s for s in specs)
    assert ShapeSpec("red", "circle", "white", "top left", "small").caption == \
        "a small red circle on a white background, top left"
    with pytest.raises(ValueError, match="not a synthetic caption"):
        parse_caption("a photo of a cat")
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        ShapeSpec("pink", "circle")


# ----------------------------------------------------------------------------------------- dataset

def test_dataset_kinds_files_and_sizes(dataset):
    kinds = collections.Counter(e.kind for e in dataset.entries)
    assert kinds["opt_out"] == 6 and sum(kinds[k] for k in BAD_KINDS) == 12 and kinds["ok"] == 18
    assert all(kinds[k] == 2 for k in BAD_KINDS)
    root = Path(dataset.folder)
    for e in dataset.entries:
        path = root / e.file
        assert path.exists() == (e.kind != "missing")
        if e.kind in ("ok", "opt_out"):
            with Image.open(path) as im:
                assert im.size == (e.width, e.height)
                assert 32 <= min(im.size) <= 80 and max(im.size) <= 1.5 * min(im.size) + 1
    shorts = [min(e.width, e.height) for e in dataset.entries if e.kind in ("ok", "opt_out")]
    assert any(s >= 64 for s in shorts) and any(s < 64 for s in shorts)
    by_kind = {e.kind: e for e in dataset.entries}
    with Image.open(root / by_kind["cmyk"].file) as im:
        assert im.mode == "CMYK"
    with Image.open(root / by_kind["palette"].file) as im:
        assert im.mode == "P" and "transparency" in im.info


def test_dataset_decodes_as_labelled(dataset):
    root = Path(dataset.folder)
    for e in dataset.entries:
        if e.kind == "missing":
            continue
        p = prepare((root / e.file).read_bytes(), [32])
        expected = {"corrupt": SkipReason.CORRUPT, "not_an_image": SkipReason.NOT_AN_IMAGE,
                    "tiny": SkipReason.TOO_SMALL}.get(e.kind)
        assert p.reason == expected, e
        if expected is None:  # the decoded picture shows its caption's background colour in a corner
            spec = parse_caption(e.caption)
            corner = (p.arrays[32][:, 0, 0] + 1) * 127.5
            assert np.abs(corner - BACKGROUNDS[spec.background]).max() < 20, e


def test_dataset_is_deterministic_and_idempotent(tmp_path, dataset):
    a = write_synthetic_dataset(tmp_path / "a", 12, size=64, seed=3, bad_fraction=0.5)
    b = write_synthetic_dataset(tmp_path / "b", 12, size=64, seed=3, bad_fraction=0.5)
    assert [e.caption for e in a.entries] == [e.caption for e in b.entries]
    for e in a.entries:
        if e.kind != "missing":
            assert (tmp_path / "a" / e.file).read_bytes() == (tmp_path / "b" / e.file).read_bytes()
    first = next(e for e in a.entries if e.kind == "ok")
    mtime = (tmp_path / "a" / first.file).stat().st_mtime_ns
    again = write_synthetic_dataset(tmp_path / "a", 12, size=64, seed=3, bad_fraction=0.5)
    assert again.entries == a.entries and (tmp_path / "a" / first.file).stat().st_mtime_ns == mtime
    assert load_synthetic_dataset(tmp_path / "a").entries == a.entries
    other = write_synthetic_dataset(tmp_path / "a", 12, size=64, seed=4)  # new params: rewritten
    assert [e.caption for e in other.entries] != [e.caption for e in a.entries]
    assert all(e.kind == "ok" for e in other.entries)


def test_dataset_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="bad_fraction"):
        write_synthetic_dataset(tmp_path, 4, bad_fraction=1.5)
    with pytest.raises(ValueError, match="size"):
        write_synthetic_dataset(tmp_path, 4, size=4)
    with pytest.raises(FileNotFoundError, match="manifest"):
        load_synthetic_dataset(tmp_path / "nothing")


def test_dataset_restricted_positions_and_sizes(tmp_path):
    ds = write_synthetic_dataset(tmp_path / "r", 24, size=32, seed=1, positions=["center"], sizes=["large"])
    specs = [parse_caption(e.caption) for e in ds.entries]
    assert {s.position for s in specs} == {"center"} and {s.size for s in specs} == {"large"}
    assert len({(s.colour, s.shape) for s in specs}) > 1  # the other attributes still vary
    two = write_synthetic_dataset(tmp_path / "t", 40, size=32, seed=1, positions=["top left", "center"])
    assert {parse_caption(e.caption).position for e in two.entries} == {"top left", "center"}
    with pytest.raises(ValueError, match="bottom right"):  # names the allowed values
        write_synthetic_dataset(tmp_path / "bad", 4, size=32, positions=["middle"])
    with pytest.raises(ValueError, match="small"):
        write_synthetic_dataset(tmp_path / "bad", 4, size=32, sizes=["huge"])


def test_url_list_parquet(tmp_path, dataset):
    uri = dataset.write_url_list(str(tmp_path / "urls" / "synthetic.parquet"), "http://127.0.0.1:9/")
    t = pq.read_table(uri)
    assert t.column_names == ["url", "caption"] and t.num_rows == len(dataset.entries)
    assert t.column("url")[0].as_py() == f"http://127.0.0.1:9/{dataset.entries[0].file}"
    assert t.column("caption").to_pylist() == [e.caption for e in dataset.entries]


# ------------------------------------------------------------------------------------------ server

def test_server_serves_files_404s_and_opt_out_headers(dataset):
    with serve_folder(dataset.folder) as srv:
        assert srv.url.startswith("http://127.0.0.1:")
        seen = collections.Counter()
        for e, row in zip(dataset.entries, dataset.rows(srv.url)):
            status, body, headers = fetch(row["url"])
            if e.kind == "missing":
                assert status == 404
                continue
            assert status == 200 and body == (Path(dataset.folder) / e.file).read_bytes()
            assert (headers.get("X-Robots-Tag") == "noai") == (e.kind == "opt_out")
            seen[e.kind] += 1
        assert seen["opt_out"] == 6
        srv.opt_out.add(dataset.entries[0].file)  # opt-outs can be changed while serving
        assert fetch(f"{srv.url}/{dataset.entries[0].file}")[2].get("X-Robots-Tag") == "noai"
    port = int(srv.url.rsplit(":", 1)[1])
    with pytest.raises(OSError):  # closed: nothing listens any more
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    srv.close()  # idempotent


def test_server_explicit_opt_out_and_tag(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"y")
    with serve_folder(tmp_path, opt_out=["b.png"], robots_tag="noimageai") as srv:
        assert fetch(f"{srv.url}/a.png")[2].get("X-Robots-Tag") is None
        assert fetch(f"{srv.url}/b.png")[2].get("X-Robots-Tag") == "noimageai"
    with pytest.raises(FileNotFoundError):
        serve_folder(tmp_path / "missing")


def test_downloaded_images_decode_like_the_files(dataset):
    """End to end through HTTP: what should survive does, with the caption's colours."""
    with serve_folder(dataset.folder) as srv:
        kept = 0
        for e, row in zip(dataset.entries, dataset.rows(srv.url)):
            status, body, headers = fetch(row["url"])
            if status != 200 or headers.get("X-Robots-Tag"):
                assert not e.expected_ok
                continue
            d = decode_image(body, min_size=32)
            assert (d.image is not None) == e.expected_ok, e
            kept += d.image is not None
            if d.image is not None:
                spec = parse_caption(e.caption)
                colours = np.asarray(d.image).reshape(-1, 3).astype(int)
                near = np.abs(colours - COLOURS[spec.colour]).sum(-1) < 40
                assert near.mean() > 0.005, e  # the named colour is really drawn
    assert kept == sum(e.expected_ok for e in dataset.entries) == 18 + 4  # ok + cmyk + palette
