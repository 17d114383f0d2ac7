"""How far microdit's GenEval (transformers Mask2Former port, open_clip colours) is from the official evaluator
(mmdetection's Mask2Former checkpoint) on the same images: per-image agreement of the verdicts and the per-tag scores
side by side.

Both read the folder microdit's GenEval step wrote ({out}/{key}/images/, GenEval's own layout). On a GPU machine with
the official environment (docs/GENEVAL.md):

    python evaluation/evaluate_images.py {out}/{key}/images --outfile official.jsonl --model-path MODELS/
    python -m bench.geneval_agreement {out}/{key}/results.jsonl official.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import PurePath

from pipeline.evaluate.geneval.scores import summarize


def image_key(path: str) -> tuple[str, str]:
    """(prompt folder, sample file) from .../{index:05d}/samples/{j:05d}.png: the same image under either tool."""
    parts = PurePath(path).parts
    return parts[-3], parts[-1]


def read_rows(path: str, field: str) -> dict[tuple[str, str], dict]:
    """Result rows by image; `field` names the row's image path ("image" for microdit's, "filename" for GenEval's)."""
    rows = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if field not in row or "correct" not in row or "tag" not in row:
                raise ValueError(f"{path}:{n}: expected a result row with {field!r}, 'tag' and 'correct'")
            rows[image_key(row[field])] = row
    return rows


def agreement(ours: dict, official: dict) -> dict:
    """Verdict agreement over the images both scored, and each side's scores over those images only."""
    common = sorted(set(ours) & set(official))
    if not common:
        raise ValueError("no image is in both result files: were they made from the same images/ folder?")
    same = sum(bool(ours[k]["correct"]) == bool(official[k]["correct"]) for k in common)
    differing = [{"image": "/".join(k), "tag": ours[k]["tag"], "ours": ours[k]["reason"],
                  "official": official[k]["reason"]} for k in common if ours[k]["correct"] != official[k]["correct"]]
    return {"images": len(common), "only_ours": len(set(ours) - set(official)),
            "only_official": len(set(official) - set(ours)), "agreement": same / len(common),
            "ours": summarize([ours[k] for k in common]), "official": summarize([official[k] for k in common]),
            "differing": differing}


def table(result: dict) -> str:
    lines = [f"{result['images']} images in both; verdicts agree on {result['agreement']:.1%}", "",
             "| tag | microdit | official |", "|---|---|---|"]
    for tag, t in result["official"]["tags"].items():
        lines.append(f"| {tag} | {result['ours']['tags'][tag]['score']:.3f} | {t['score']:.3f} |")
    lines.append(f"| overall | {result['ours']['overall']:.3f} | {result['official']['overall']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ours", help="microdit's results.jsonl")
    parser.add_argument("official", help="the results.jsonl of GenEval's evaluation/evaluate_images.py")
    parser.add_argument("--json", help="also write the comparison (with every differing image) here")
    args = parser.parse_args(argv)
    try:
        result = agreement(read_rows(args.ours, "image"), read_rows(args.official, "filename"))
    except (OSError, ValueError) as e:
        print(f"geneval_agreement: {e}", file=sys.stderr)
        return 2
    print(table(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
