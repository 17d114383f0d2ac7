"""GenEval (pipeline/evaluate/geneval/): the protocol's verdict on constructed detections, one case per rule, with
the verdict derived by hand; the prompts' checks; the detector's and colour model's plumbing (tiny models built from
config); the resumable step on the debug model; the CLI."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from pipeline.evaluate.geneval.colour import ColourClassifier
from pipeline.evaluate.geneval.detector import Detector, label_map
from pipeline.evaluate.geneval.prompts import object_names, read_prompts, subset
from pipeline.evaluate.geneval.rules import TAGS, Detection, keep, relative_position, verdict
from pipeline.evaluate.geneval.scores import summarize, tag_table


def det(x1, y1, x2, y2, score=0.95, colour=None):
    d = Detection((x1, y1, x2, y2), score)
    d.colour = colour  # what the stand-in colour classifier below reads
    return d


def colour_of(image, detections, name):
    return [d.colour for d in detections]


def judge(metadata, detections):
    return verdict(None, keep(detections, metadata["tag"]), metadata, colour_of)


def one(name, tag="single_object", **extra):
    return {"tag": tag, "include": [{"class": name, "count": 1, **extra}], "prompt": f"a photo of a {name}"}


# --------------------------------------------------------------------------------------------------------- rules


def test_a_detection_counts_above_0_3():
    assert judge(one("bench"), {"bench": [det(0, 0, 10, 10, 0.31)]}) == (True, "")
    assert judge(one("bench"), {"bench": [det(0, 0, 10, 10, 0.3)]}) == (False, "expected bench>=1, found 0")
    assert judge(one("bench"), {"cow": [det(0, 0, 10, 10, 0.99)]})[0] is False


def test_counting_prompts_keep_only_detections_above_0_9_and_exclude_one_more():
    three = {"tag": "counting", "include": [{"class": "cup", "count": 3}], "exclude": [{"class": "cup", "count": 4}],
             "prompt": "a photo of three cups"}
    cups = [det(0, 0, 5, 5, s) for s in (0.95, 0.92, 0.85)]
    assert judge(three, {"cup": cups}) == (False, "expected cup>=3, found 2")  # 0.85 falls under 0.9
    assert judge({**three, "tag": "two_object"}, {"cup": cups})[0] is True  # the same detections, threshold 0.3
    four = cups[:2] + [det(0, 0, 5, 5, 0.97), det(0, 0, 5, 5, 0.91)]
    assert judge(three, {"cup": four}) == (False, "expected cup<4, found 4")
    assert len(keep({"cup": [det(0, 0, 5, 5, 0.5)] * 20}, "colors")["cup"]) == 16  # at most 16 per class


def test_colour_is_checked_on_the_most_confident_detections_only():
    red_car = one("car", tag="colors", color="red")
    top_red = [det(0, 0, 9, 9, 0.9, "red"), det(0, 0, 9, 9, 0.8, "blue")]
    assert judge(red_car, {"car": top_red}) == (True, "")
    top_blue = [det(0, 0, 9, 9, 0.9, "blue"), det(0, 0, 9, 9, 0.8, "red")]
    ok, reason = judge(red_car, {"car": top_blue})
    assert not ok and reason == "expected red car>=1, found 0 red; and 1 blue"


def test_position_shrinks_the_offset_by_a_tenth_of_both_sizes():
    a = det(0, 0, 10, 10)
    assert relative_position(a, det(12, 0, 22, 10)) == {"left of"}  # |dx| 12 - 2 = 10, / 12 = 0.83
    assert relative_position(a, det(4, 0, 14, 10)) == set()  # |dx| 4 - 2 = 2, / 4 = 0.5: not past 0.5
    assert relative_position(det(20, 15, 30, 25), a) == {"right of", "below"}  # (18, 13) / 25
    assert relative_position(a, det(0, 0, 10, 10)) == set()


def test_position_needs_every_pair_and_a_met_target_group():
    meta = {"tag": "position", "prompt": "a photo of a dog left of a cat",
            "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}]}
    cat, dog_left, dog_right = det(50, 0, 60, 10), det(0, 0, 10, 10), det(90, 0, 100, 10)
    assert judge(meta, {"cat": [cat], "dog": [dog_left]}) == (True, "")
    ok, reason = judge(meta, {"cat": [cat], "dog": [dog_right]})
    assert not ok and reason == "expected dog left of target, found right of target"
    ok, reason = judge(meta, {"dog": [dog_left]})  # the target group (the cat) was not met
    assert not ok and reason == "expected cat>=1, found 0\nno target for dog to be left of"
    two_cats = {"cat": [cat, det(0, 50, 5, 60, 0.5)], "dog": [dog_left]}  # only the top cat is the group
    assert judge(meta, two_cats)[0] is True


def test_colour_attribute_and_two_objects_need_both_clauses():
    meta = {"tag": "color_attr", "prompt": "a photo of a red bench and a blue cow",
            "include": [{"class": "bench", "count": 1, "color": "red"}, {"class": "cow", "count": 1, "color": "blue"}]}
    good = {"bench": [det(0, 0, 5, 5, colour="red")], "cow": [det(0, 0, 5, 5, colour="blue")]}
    assert judge(meta, good) == (True, "")
    swapped = {"bench": [det(0, 0, 5, 5, colour="blue")], "cow": [det(0, 0, 5, 5, colour="red")]}
    ok, reason = judge(meta, swapped)
    assert not ok and reason.count("expected") == 2


def test_scores_are_per_tag_means_then_their_mean():
    rows = [{"tag": "counting", "correct": c} for c in (True, False, False, False)] + \
           [{"tag": "colors", "correct": True}]
    s = summarize(rows)
    assert s["tags"]["counting"] == {"score": 0.25, "correct": 1, "images": 4}
    assert s["overall"] == pytest.approx((0.25 + 1.0) / 2) and s["images"] == 5  # tags weigh alike, not images
    table = tag_table({**s, "family": "emmdit", "complete": False})
    assert table[-1] == ("overall (prompt subset)", "0.625", "0.66 (E-MMDiT (Nitro-E, 512 px))")


# ------------------------------------------------------------------------------------------------------ prompts


def test_shipped_prompts_are_geneval_s_553():
    prompts = read_prompts()
    assert len(prompts) == 553 and len(object_names()) == 80
    tags = {p.tag for p in prompts}
    assert tags == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    small = subset(prompts, per_tag=2)
    assert len(small) == 12 and [p.index for p in subset(prompts, indices=[5, 1])] == [1, 5]


@pytest.mark.parametrize("row,message", [
    ({"include": [{"class": "cow", "count": 1}], "prompt": "a cow"}, "has no 'tag'"),
    ({"tag": "single_object", "include": [{"class": "unicorn", "count": 1}], "prompt": "a unicorn"},
     "unknown class 'unicorn'"),
    ({"tag": "colors", "include": [{"class": "cow", "count": 1, "color": "teal"}], "prompt": "a teal cow"},
     "unknown colour 'teal'"),
    ({"tag": "position", "include": [{"class": "cow", "count": 1, "position": ["left of", 0]}], "prompt": "x"},
     "earlier include clause"),
])
def test_bad_prompt_rows_are_named(tmp_path, row, message):
    path = tmp_path / "meta.jsonl"
    path.write_text(json.dumps(one("bench")) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=f"meta.jsonl line 2: .*{message}"):
        read_prompts(str(path))


def test_a_detector_that_does_not_label_the_80_classes_is_named():
    names = object_names()
    coco = {i: n for i, n in enumerate(names)}
    coco.update({names.index(g): c for g, c in (("computer mouse", "mouse"), ("tv remote", "remote"),
                                                ("computer keyboard", "keyboard"))})  # COCO's spelling, by name
    assert set(label_map(coco, names).values()) == set(names)
    voc = {i: n for i, n in enumerate(["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat"])}
    with pytest.raises(ValueError, match=r"do not cover GenEval's 80 COCO classes: missing \['person'"):
        label_map(voc, names)


# ------------------------------------------------------------------------------------------- models (tiny, CPU)


def test_tiny_detector_gives_instances_with_boxes_from_their_masks():
    detector = Detector("tiny-mask2former", object_names())
    images = [Image.fromarray((np.random.RandomState(i).rand(48, 72, 3) * 255).astype(np.uint8)) for i in range(2)]
    found = detector.detect(images)
    assert len(found) == 2 and found[0]
    for dets in found[0].values():
        scores = [d.score for d in dets]
        assert scores == sorted(scores, reverse=True)
        for d in dets:
            assert d.mask.shape == (48, 72) and d.mask.any()
            rows, cols = np.nonzero(d.mask)
            assert d.box == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)


def test_colour_crop_greys_out_the_background_and_crops_to_the_box():
    image = Image.new("RGB", (20, 10), (200, 10, 10))
    mask = np.zeros((10, 20), bool)
    mask[2:6, 3:8] = True
    crop = np.asarray(ColourClassifier.crop(image, Detection((2, 1, 10, 8), 0.9, mask)))
    assert crop.shape == (7, 8, 3)
    assert tuple(crop[1, 1]) == (200, 10, 10) and tuple(crop[0, 0]) == (0x99, 0x99, 0x99)
    colours = ColourClassifier("tiny-clip")(image, [Detection((2, 1, 10, 8), 0.9, mask)] * 3, "apple")
    assert len(colours) == 3 and len(set(colours)) == 1 and colours[0] in ("red", "orange", "yellow", "green", "blue",
                                                                           "purple", "pink", "brown", "black", "white")


# ---------------------------------------------------------------------------------------------- the step, the CLI


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    from test_generate import _random_model, write_export

    return write_export(tmp_path_factory.mktemp("geneval_export"), _random_model(0), ema=_random_model(1))


SMOKE = dict(enabled=True, per_tag=1, images_per_prompt=2, steps=1, draw_batch_size=3,
             detector="tiny-mask2former", colour_model="tiny-clip")


def test_a_killed_step_draws_only_the_missing_images_and_gives_the_same_summary(export, tmp_path, monkeypatch):
    from pipeline.core.plan import GenEvalConfig
    from pipeline.evaluate.geneval import step
    from pipeline.generate import Generator

    drawn = []
    real = Generator.sample
    monkeypatch.setattr(Generator, "sample", lambda self, p, *a, **k: drawn.extend(p) or real(self, p, *a, **k))
    cfg = GenEvalConfig(**SMOKE)
    clean = step.run_geneval(export, str(tmp_path / "clean"), cfg)
    assert len(drawn) == 12 and clean["images"] == 12 and set(clean["tags"]) == set(TAGS)
    folder = clean["folder"]
    rows = [json.loads(line) for line in open(os.path.join(folder, "results.jsonl"))]
    assert len(rows) == 12 and {r["index"] for r in rows} == {p.index for p in subset(read_prompts(), per_tag=1)}
    assert os.path.isfile(os.path.join(folder, "images", f"{rows[0]['index']:05d}", "samples", "00001.png"))

    class Killed(Exception):
        pass

    def kill_after_two_batches(record):
        if record.done >= 6:
            raise Killed()

    drawn.clear()
    with pytest.raises(Killed):
        step.run_geneval(export, str(tmp_path / "killed"), cfg, progress=kill_after_two_batches)
    assert len(drawn) == 6
    drawn.clear()
    again = step.run_geneval(export, str(tmp_path / "killed"), cfg)
    assert len(drawn) == 6  # only the missing images
    strip = lambda s: {k: v for k, v in s.items() if k not in ("folder", "request")}  # noqa: E731
    assert strip(again) == strip(clean)
    lines = open(os.path.join(again["folder"], "results.jsonl")).read().splitlines()
    assert len(lines) == 12 and len(set(lines)) == 12  # no duplicate rows
    drawn.clear()
    assert step.run_geneval(export, str(tmp_path / "killed"), cfg) == again and drawn == []  # done: a no-op


def test_cli_evaluate_geneval_prints_the_tag_table(export, tmp_path, capsys):
    from cli.main import main

    assert main(["evaluate", export, str(tmp_path / "run"), "--geneval", "--per-tag", "1", "--images-per-prompt", "1",
                 "--steps", "1", "--detector", "tiny-mask2former", "--colour-model", "tiny-clip"]) == 0
    out = capsys.readouterr().out
    assert "overall (prompt subset)" in out and "0.46 (MicroDiT (1.16B))" in out and "counting" in out
    metrics = json.load(open(tmp_path / "run" / "eval" / "metrics.json"))
    assert metrics["geneval"]["images"] == 6 and metrics["geneval"]["family"] == "microdit"
    assert main(["evaluate", export, str(tmp_path / "none")]) == 2  # nothing asked for


def test_agreement_with_the_official_evaluator_matches_images_by_their_place(tmp_path, capsys):
    """bench/geneval_agreement.py pairs our rows with GenEval's own (`filename`, another root) by prompt folder and
    sample, and reports the verdicts' agreement and both sides' tag scores over the images both scored."""
    from bench.geneval_agreement import main

    def rows(root, field, verdicts):
        return "".join(json.dumps({field: f"{root}/{i:05d}/samples/{j:05d}.png", "tag": tag, "correct": ok,
                                   "reason": "" if ok else "no"}) + "\n"
                       for (i, j, tag), ok in verdicts.items())

    ours = {(0, 0, "single_object"): True, (0, 1, "single_object"): True, (1, 0, "counting"): False}
    official = {**ours, (0, 1, "single_object"): False, (2, 0, "colors"): True}
    (tmp_path / "ours.jsonl").write_text(rows("/runs/r/eval/geneval/k/images", "image", ours))
    (tmp_path / "official.jsonl").write_text(rows("/gpu/images", "filename", official))
    assert main([str(tmp_path / "ours.jsonl"), str(tmp_path / "official.jsonl"), "--json",
                 str(tmp_path / "cmp.json")]) == 0
    result = json.loads((tmp_path / "cmp.json").read_text())
    assert result["images"] == 3 and result["only_official"] == 1 and result["agreement"] == pytest.approx(2 / 3)
    assert result["ours"]["tags"]["single_object"]["score"] == 1.0
    assert result["official"]["tags"]["single_object"]["score"] == 0.5
    assert [d["image"] for d in result["differing"]] == ["00000/00001.png"]
    assert "| single_object | 1.000 | 0.500 |" in capsys.readouterr().out
    (tmp_path / "bad.jsonl").write_text(json.dumps({"file": "x"}) + "\n")
    assert main([str(tmp_path / "ours.jsonl"), str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
