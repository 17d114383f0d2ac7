"""Source adapters against small fake copies of each dataset in its published file layout."""
from __future__ import annotations

import io
import json
import os
import tarfile
import urllib.request
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data import sources

from pipeline.core import storage
from pipeline.data.sources.shards import IngestConfig, read_shard_tar

POLICY = {"min_side": 32, "max_side": 64}  # tiny stand-in for the recipe's 256 / 512


def jpeg(w: int, h: int, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, "JPEG")
    return buf.getvalue()


def png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 90, 200)).save(buf, "PNG")
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def samples(folder) -> list[dict]:
    """Every sample of every tar in folder, decoded: key, caption, json, image size."""
    out = []
    for uri in storage.list_files(str(folder), ".tar"):
        for s in read_shard_tar(uri):
            assert {"jpg", "txt", "json"} <= set(s), s.keys()
            meta = json.loads(s["json"])
            out.append({"key": s["__key__"], "caption": s["txt"].decode(), "meta": meta,
                        "size": Image.open(io.BytesIO(s["jpg"])).size, "shard": os.path.basename(uri)})
    keys = [s["key"] for s in out]
    assert len(keys) == len(set(keys)), "duplicate keys"
    return out


# ------------------------------------------------------------------------------------------ registry

def test_registry_lists_kinds_and_rejects_unknown():
    assert {"cc12m", "diffusiondb", "journeydb", "sa1b", "textcaps", "coco2014_val", "synthetic"} <= set(
        sources.known())
    with pytest.raises(ValueError, match="unknown source kind 'laion'.*cc12m"):
        sources.get("laion")
    assert sources.get("cc12m").output == "urls" and sources.get("sa1b").output == "shards"
    with pytest.raises(ValueError, match="options.pth = 'x': Extra inputs are not permitted"):
        sources.get("cc12m").build({"pth": "x"})
    with pytest.raises(ValueError, match="min_side"):
        IngestConfig(min_side=600, max_side=512)


# ---------------------------------------------------------------------------------------------- cc12m

def test_cc12m_tsv_to_url_list(tmp_path):
    tsv = tmp_path / "cc12m.tsv"
    tsv.write_text('https://a.example/1.jpg\ta "quoted" <PERSON> caption\n'
                   "http://b.example/2.png\tsecond caption\n"
                   "not-a-url\tdropped\n", encoding="utf-8")
    out = str(tmp_path / "urls" / "cc12m.parquet")
    report = sources.prepare("cc12m", {"path": str(tsv)}, out)
    t = pq.read_table(out)
    assert t["url"].to_pylist() == ["https://a.example/1.jpg", "http://b.example/2.png"]
    assert t["caption"].to_pylist() == ['a "quoted" <PERSON> caption', "second caption"]
    assert report["rows"] == 2 and report["dropped_not_http"] == 1
    assert sources.prepare("cc12m", {"path": str(tsv)}, out)["skipped"] is True  # idempotent

    bad = tmp_path / "bad.tsv"
    bad.write_text("http://x/1.jpg\tcap\textra column\n")
    with pytest.raises(ValueError, match="bad.tsv"):
        sources.prepare("cc12m", {"path": str(bad)}, str(tmp_path / "b.parquet"))
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        sources.prepare("cc12m", {"path": str(tmp_path / "missing.tsv")}, str(tmp_path / "c.parquet"))


# ----------------------------------------------------------------------------------------- diffusiondb

def _diffusiondb(root):
    """DiffusionDB Large layout: metadata-large.parquet + diffusiondb-large-part-1/part-00000N.zip (webp/png)."""
    rows = [  # image_name, prompt, part_id, image_nsfw, prompt_nsfw
        ("a.png", "kept, low score", 1, 0.10, 0.0),
        ("b.png", "kept, exactly at threshold", 1, 0.20, 0.1),
        ("c.png", "dropped, image nsfw", 1, 0.21, 0.0),
        ("d.png", "dropped, prompt nsfw", 1, 0.05, 0.5),
        ("e.png", "dropped, unknown score", 1, None, 0.0),
        ("f.png", "kept but too small", 1, 0.0, 0.0),
        ("g.png", "kept, large: shrunk", 2, 0.0, 0.0),
        ("h.png", "kept but missing from its zip", 2, 0.0, 0.0),
        ("i.png", "part 3 not downloaded", 3, 0.0, 0.0),
    ]
    cols = list(zip(*rows))
    root.mkdir(parents=True)
    pq.write_table(pa.table({"image_name": list(cols[0]), "prompt": list(cols[1]),
                             "part_id": pa.array(cols[2], pa.uint16()),
                             "image_nsfw": pa.array(cols[3], pa.float32()),
                             "prompt_nsfw": pa.array(cols[4], pa.float32()),
                             "seed": list(range(len(rows)))}), root / "metadata-large.parquet")
    sizes = {"a.png": (48, 40), "b.png": (40, 50), "c.png": (50, 50), "d.png": (50, 50), "e.png": (50, 50),
             "f.png": (20, 50), "g.png": (200, 100)}
    part_dir = root / "diffusiondb-large-part-1"
    part_dir.mkdir(parents=True)
    for part, names in ((1, "abcdef"), (2, "g")):
        with zipfile.ZipFile(part_dir / f"part-{part:06d}.zip", "w") as z:
            for n in names:
                z.writestr(f"{n}.png", png(*sizes[f"{n}.png"]))
            z.writestr(f"part-{part:06d}.json", json.dumps({}))


def test_diffusiondb_nsfw_filter_and_ingest(tmp_path):
    root = tmp_path / "diffusiondb"
    _diffusiondb(root)
    out = str(tmp_path / "shards")
    report = sources.prepare("diffusiondb", {"root": str(root), "ingest": POLICY}, out)
    got = {s["caption"]: s for s in samples(out)}
    assert set(got) == {"kept, low score", "kept, exactly at threshold", "kept, large: shrunk"}
    assert got["kept, large: shrunk"]["size"] == (128, 64)  # short side 100 -> 64, aspect kept
    assert got["kept, low score"]["size"] == (48, 40)  # within the policy: untouched
    assert got["kept, low score"]["meta"]["image_name"] == "a.png"
    assert sorted(s["shard"] for s in got.values()) == ["00001.tar", "00001.tar", "00002.tar"]
    assert report["nsfw_dropped"] == 3 and report["rows_in_absent_parts"] == 1
    assert report["images_written"] == 3
    assert report["failures_by_reason"] == {"missing_in_archive": 1, "too_small": 1}
    assert storage.exists(os.path.join(out, "_SUCCESS"))

    # Interrupted rerun: shard 2's stats lost (as if killed before its marker) -> only it is redone, no duplicates.
    os.remove(os.path.join(out, "_SUCCESS"))
    os.remove(os.path.join(out, "00002_stats.json"))
    before = os.path.getmtime(os.path.join(out, "00001.tar"))
    again = sources.prepare("diffusiondb", {"root": str(root), "ingest": POLICY}, out)
    assert os.path.getmtime(os.path.join(out, "00001.tar")) == before
    assert len(samples(out)) == 3 and again["images_written"] == 3


def test_diffusiondb_bad_metadata(tmp_path):
    root = tmp_path / "ddb"
    root.mkdir()
    pq.write_table(pa.table({"image_name": ["a.png"], "prompt": ["x"]}), root / "metadata.parquet")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['part_id', 'image_nsfw'\].*columns found"):
        sources.prepare("diffusiondb", {"root": str(root)}, str(tmp_path / "o"))
    pq.write_table(pa.table({"image_name": ["a.png"], "prompt": ["x"], "part_id": [1], "image_nsfw": [0.0]}),
                   root / "metadata.parquet")
    with pytest.raises(ValueError, match=r"nsfw_columns \['prompt_nswf'\] are not in"):  # a typo filters nothing
        sources.prepare("diffusiondb", {"root": str(root), "nsfw_columns": ["image_nsfw", "prompt_nswf"]},
                        str(tmp_path / "o"))


# ------------------------------------------------------------------------------------------- journeydb

def test_journeydb_annotations_and_tgz_archives(tmp_path):
    data = tmp_path / "data" / "train"
    (data / "imgs").mkdir(parents=True)
    anno = [
        {"img_path": "./000/u1.jpg", "prompt": "a cat --v 5", "Task2": {"Caption": "A cat."}},
        {"img_path": "./000/u2.png", "prompt": "tiny", "Task2": {"Caption": "Tiny."}},
        {"img_path": "./001/u3.jpg", "prompt": "a castle", "Task2": {"Caption": "A castle."}},
        {"img_path": "./001/u3.jpg", "prompt": "a castle", "Task2": {"Caption": "A castle."}},  # listed twice
        {"img_path": "./002/u4.jpg", "prompt": "archive not downloaded", "Task2": {"Caption": "x"}},
    ]
    jsonl = "\n".join(json.dumps(a) for a in anno).encode()
    with tarfile.open(data / "train_anno_realease_repath.jsonl.tgz", "w:gz") as t:
        add(t, "train_anno_realease_repath.jsonl", jsonl)
    with tarfile.open(data / "imgs" / "000.tgz", "w:gz") as t:
        add(t, "000/u1.jpg", jpeg(120, 90))
        add(t, "000/u2.png", png(16, 16))
        add(t, "000/unlisted.jpg", jpeg(60, 60))
    with tarfile.open(data / "imgs" / "001.tgz", "w:gz") as t:
        add(t, "./001/u3.jpg", jpeg(60, 90))
    opts = {"annotations": str(data / "train_anno_realease_repath.jsonl.tgz"), "images": str(data / "imgs"),
            "ingest": POLICY}
    report = sources.prepare("journeydb", opts, str(tmp_path / "out"))
    got = {s["caption"]: s for s in samples(tmp_path / "out")}
    assert set(got) == {"a cat --v 5", "a castle"}
    assert got["a cat --v 5"]["size"] == (85, 64) and got["a castle"]["size"] == (60, 90)
    assert got["a castle"]["shard"] == "00001.tar"
    assert report["rows_in_absent_archives"] == 1 and report["failures_by_reason"] == {"too_small": 1}
    assert report["duplicate_annotations"] == 1 and report["images_written"] == 2

    caps = sources.prepare("journeydb", {**opts, "caption_field": "caption"}, str(tmp_path / "out2"))
    assert {s["caption"] for s in samples(tmp_path / "out2")} == {"A cat.", "A castle."}
    assert caps["images_written"] == 2


# ------------------------------------------------------------------------------------------------ sa1b

def test_sa1b_archives_with_llava_captions(tmp_path):
    arch, caps = tmp_path / "sa1b", tmp_path / "captions"
    arch.mkdir()
    caps.mkdir()
    for n, ids in ((0, (1, 2)), (1, (3,))):
        with tarfile.open(arch / f"sa_{n:06d}.tar", "w") as t:
            for i in ids:
                add(t, f"sa_{i}.jpg", jpeg(150, 100))
                add(t, f"sa_{i}.json", json.dumps({"image": {"image_id": i, "file_name": f"sa_{i}.jpg"},
                                                   "annotations": []}).encode())
    (caps / "sa_1.txt").write_text("The image shows a red wall.\n")
    (caps / "sa_3.txt").write_text("A red square.")
    report = sources.prepare("sa1b", {"archives": str(arch), "captions": str(caps),
                                      "ingest": {**POLICY, "processes": 2}}, str(tmp_path / "out"))
    got = {s["meta"]["image"]: s for s in samples(tmp_path / "out")}
    assert set(got) == {"sa_1", "sa_3"}
    assert got["sa_1"]["caption"] == "The image shows a red wall." and got["sa_1"]["size"] == (96, 64)
    assert got["sa_3"]["shard"] == "00001.tar"
    assert report["failures_by_reason"] == {"no_caption": 1}

    mapping = tmp_path / "captions.json"
    mapping.write_text(json.dumps({"sa_2": "From the mapping file."}))
    r2 = sources.prepare("sa1b", {"archives": str(arch), "captions": str(mapping), "ingest": POLICY},
                         str(tmp_path / "out2"))
    assert [s["caption"] for s in samples(tmp_path / "out2")] == ["From the mapping file."]
    assert r2["failures_by_reason"] == {"no_caption": 2}


# -------------------------------------------------------------------------------------------- textcaps

def _textcaps(path):
    def entry(image_id, caption_id, caption, refs):
        return {"image_id": image_id, "image_classes": ["Poster"], "caption_id": caption_id,
                "caption_str": caption, "reference_strs": refs, "set_name": "train",
                "flickr_original_url": f"https://farm.example/{image_id}_o.jpg",
                "flickr_300k_url": f"https://farm.example/{image_id}_z.jpg", "image_width": 1024,
                "image_height": 683, "image_path": f"train/{image_id}.jpg", "image_name": image_id}
    refs_a = ["a sign says open", "the sign reads open"]
    data = [entry("bbb", 7, "the sign reads open", refs_a), entry("bbb", 2, "a sign says open", refs_a),
            entry("aaa", 0, "a bottle of coca cola", ["a bottle of coca cola"]),
            {"image_id": "ccc", "set_name": "test", "flickr_original_url": "https://farm.example/c.jpg"}]
    path.write_text(json.dumps({"dataset_type": "train", "dataset_name": "textcaps", "dataset_version": "0.1",
                                "data": data}))


def test_textcaps_url_list_one_row_per_image(tmp_path):
    ann = tmp_path / "TextCaps_0.1_train.json"
    _textcaps(ann)
    out = str(tmp_path / "textcaps.parquet")
    report = sources.prepare("textcaps", {"annotations": str(ann)}, out)
    t = pq.read_table(out).to_pylist()
    assert [r["image_id"] for r in t] == ["aaa", "bbb"]
    assert t[1]["caption"] == "a sign says open"  # lowest caption_id
    assert t[1]["url"] == "https://farm.example/bbb_o.jpg"
    assert json.loads(t[1]["all_captions"]) == ["a sign says open", "the sign reads open"]
    assert report["no_caption"] == 1 and report["rows"] == 2


def test_textcaps_local_images_ingested(tmp_path):
    ann = tmp_path / "TextCaps_0.1_train.json"
    _textcaps(ann)
    imgs = tmp_path / "train_images"
    imgs.mkdir()
    (imgs / "aaa.jpg").write_bytes(jpeg(64, 40))  # bbb.jpg missing
    report = sources.prepare("textcaps_local", {"annotations": str(ann), "images": str(imgs),
                                                "ingest": POLICY}, str(tmp_path / "out"))
    got = samples(tmp_path / "out")
    assert [(s["caption"], s["meta"]["image_id"]) for s in got] == [("a bottle of coca cola", "aaa")]
    assert report["failures_by_reason"] == {"missing_image": 1}
    # The webdataset library itself reads the shard: key.jpg / key.txt / key.json grouped by key.
    import webdataset as wds

    (sample,) = list(wds.WebDataset(str(tmp_path / "out" / "00000.tar"), shardshuffle=False))
    assert sample["__key__"] == got[0]["key"] and sample["txt"] == b"a bottle of coca cola"
    assert Image.open(io.BytesIO(sample["jpg"])).size == (64, 40)


def test_ingest_to_s3(tmp_path, s3_endpoint, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    ann = tmp_path / "TextCaps_0.1_train.json"
    _textcaps(ann)
    imgs = tmp_path / "train_images"
    imgs.mkdir()
    (imgs / "aaa.jpg").write_bytes(jpeg(64, 40))
    (imgs / "bbb.jpg").write_bytes(jpeg(300, 100))
    out = f"s3://{s3_bucket}/data/shards/textcaps"
    report = sources.prepare("textcaps_local", {"annotations": str(ann), "images": str(imgs), "ingest": POLICY},
                             out)
    assert report["images_written"] == 2 and storage.exists(f"{out}/_SUCCESS")
    assert sorted((s["meta"]["image_id"], s["size"]) for s in samples(out)) == [("aaa", (64, 40)),
                                                                                  ("bbb", (192, 64))]


# ------------------------------------------------------------------------------------------------ coco

def _coco(tmp_path, n=5):
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg", "width": 80, "height": 60,
               "coco_url": f"http://images.cocodataset.org/val2014/COCO_val2014_{i:012d}.jpg"}
              for i in range(1, n + 1)]
    anns = []
    for im in images:  # three captions each, annotation ids out of order, one with a newline
        i = im["id"]
        anns += [{"id": 100 * i + 5, "image_id": i, "caption": f"later {i}"},
                 {"id": 100 * i + 1, "image_id": i, "caption": f"first\n{i} "},
                 {"id": 100 * i + 9, "image_id": i, "caption": f"last {i}"}]
    (tmp_path / "annotations").mkdir()
    ann = tmp_path / "annotations" / "captions_val2014.json"
    ann.write_text(json.dumps({"info": {}, "images": images, "annotations": anns}))
    with zipfile.ZipFile(tmp_path / "val2014.zip", "w") as z:
        for im in images:
            w, h = (20, 20) if im["id"] == 2 else (120, 90)  # image 2 is below min_side
            z.writestr(f"val2014/{im['file_name']}", jpeg(w, h))
    return ann


def test_coco_eval_captions_and_images(tmp_path):
    ann = _coco(tmp_path)
    out = str(tmp_path / "coco")
    report = sources.prepare("coco2014_val", {"annotations": str(ann), "images": str(tmp_path / "val2014.zip"),
                                              "ingest": POLICY}, out)
    caps = pq.read_table(os.path.join(out, "_eval_captions.parquet")).to_pylist()
    assert [c["image_id"] for c in caps] == [1, 2, 3, 4, 5]
    for c in caps:  # one of the image's own captions, whitespace collapsed ("first\n1 " -> "first 1")
        assert c["caption"] in {f"later {c['image_id']}", f"first {c['image_id']}", f"last {c['image_id']}"}
    assert len({c["caption"].split()[0] for c in caps}) > 1  # drawn, not always the lowest annotation id
    # The evaluation draws the same caption for every image it shares with the ingest (one protocol).
    from pipeline.evaluate.evaluate import coco_eval_set
    by_id = {c["image_id"]: c["caption"] for c in caps}
    for n in (5, 3):
        assert all(by_id[r["image_id"]] == r["caption"] for r in coco_eval_set(str(tmp_path), n, seed=0))
    got = {s["key"]: s for s in samples(out)}
    assert len(got) == 4 and report["failures_by_reason"] == {"too_small": 1}
    for c in caps:  # keys pair captions with their shard images; null where the policy dropped the image
        if c["image_id"] == 2:
            assert c["key"] is None
        else:
            assert got[c["key"]]["caption"] == c["caption"] and got[c["key"]]["size"] == (85, 64)

    sub = [sources.coco.eval_captions(str(ann), max_images=3, seed=7)["image_id"].to_pylist() for _ in range(2)]
    assert sub[0] == sub[1] and len(sub[0]) == 3 and sub[0] == sorted(sub[0])


# ------------------------------------------------------------------------------------------- synthetic

def test_synthetic_source_points_at_callers_server(tmp_path):
    from pipeline.data.shapes import serve_folder

    images = tmp_path / "syn"
    out = str(tmp_path / "synthetic.parquet")
    with pytest.raises(ValueError, match="base_url"):
        sources.prepare("synthetic", {"images_dir": str(images), "base_url": "127.0.0.1:1"}, out)
    sources.prepare("synthetic", {"images_dir": str(images), "base_url": "http://127.0.0.1:1", "n": 6,
                                  "size": 32}, out)  # writes the images
    with serve_folder(images) as server:
        report = sources.prepare("synthetic", {"images_dir": str(images), "base_url": server.url, "n": 6,
                                               "size": 32}, out)
        rows = pq.read_table(out).to_pylist()
        assert report["rows"] == 6 and all(r["url"].startswith(server.url) for r in rows)
        with urllib.request.urlopen(rows[0]["url"], timeout=5) as r:
            Image.open(io.BytesIO(r.read())).verify()
