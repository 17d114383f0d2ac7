"""GenEval's scores: per tag, the share of correct images; overall, the mean of the six tag scores; and the table the
report and the CLI show beside the papers' figures."""
from __future__ import annotations

from typing import Mapping, Sequence

from pipeline.evaluate.geneval.rules import TAGS

# The papers' GenEval overall scores.
PAPERS = {"emmdit": ("E-MMDiT (Nitro-E, 512 px)", 0.66), "microdit": ("MicroDiT (1.16B)", 0.46)}


def summarize(rows: Sequence[Mapping]) -> dict:
    """Per-tag accuracy over images and the overall score (the mean of the tag scores present), with counts."""
    tags: dict[str, list[bool]] = {}
    for row in rows:
        tags.setdefault(row["tag"], []).append(bool(row["correct"]))
    per_tag = {tag: sum(v) / len(v) for tag, v in tags.items()}
    return {"overall": sum(per_tag.values()) / len(per_tag) if per_tag else None,
            "tags": {tag: {"score": per_tag[tag], "correct": sum(tags[tag]), "images": len(tags[tag])}
                     for tag in TAGS if tag in tags},
            "images": len(rows)}


def tag_table(summary: dict) -> list[tuple[str, str, str]]:
    """(tag, our score, the paper's) rows for the report: per tag, then overall."""
    title, paper = PAPERS.get(summary.get("family") or "", (None, None))
    rows = [(tag, f"{t['score']:.3f} ({t['correct']}/{t['images']})", "") for tag, t in summary["tags"].items()]
    overall = "n/a" if summary["overall"] is None else f"{summary['overall']:.3f}"
    rows.append(("overall" + ("" if summary.get("complete") else " (prompt subset)"), overall,
                 f"{paper} ({title})" if paper is not None else ""))
    return rows
