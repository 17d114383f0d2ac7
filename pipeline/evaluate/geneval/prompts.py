"""GenEval's 553 prompts and their metadata (shipped beside this file with GenEval's licence: NOTICE), read and
checked: every row has a known tag and a prompt, every clause a class of GenEval's 80 and a count, every colour and
relation one the protocol knows, every position a reference to an earlier clause. A subset for smoke runs keeps the
prompts' own indices, so its images and results are those of the full run."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pipeline.core import storage
from pipeline.evaluate.geneval.rules import COLORS, RELATIONS, TAGS

HERE = Path(__file__).resolve().parent
METADATA = str(HERE / "evaluation_metadata.jsonl")
OBJECT_NAMES = str(HERE / "object_names.txt")


@dataclass(frozen=True)
class Prompt:
    index: int  # the line of the metadata file: image folders are named after it
    metadata: dict

    @property
    def text(self) -> str:
        return self.metadata["prompt"]

    @property
    def tag(self) -> str:
        return self.metadata["tag"]


def object_names() -> list[str]:
    """GenEval's 80 class names, in COCO's class order."""
    return [line.strip() for line in Path(OBJECT_NAMES).read_text(encoding="utf-8").splitlines() if line.strip()]


def _check(row, where: str, names: set[str]) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "tag" not in row:
        raise ValueError(f"{where}: the row has no 'tag'; expected one of {list(TAGS)}")
    if row["tag"] not in TAGS:
        raise ValueError(f"{where}: unknown tag {row['tag']!r}; expected one of {list(TAGS)}")
    if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
        raise ValueError(f"{where}: the row has no prompt text")
    includes = row.get("include", [])
    for kind in ("include", "exclude"):
        for k, clause in enumerate(row.get(kind, [])):
            at = f"{where}: {kind}[{k}]"
            if clause.get("class") not in names:
                raise ValueError(f"{at}: unknown class {clause.get('class')!r}; expected one of GenEval's 80 "
                                 f"({OBJECT_NAMES})")
            if not isinstance(clause.get("count"), int) or clause["count"] < 1:
                raise ValueError(f"{at}: count {clause.get('count')!r} is not a positive integer")
            if "color" in clause and clause["color"] not in COLORS:
                raise ValueError(f"{at}: unknown colour {clause['color']!r}; expected one of {list(COLORS)}")
            if "position" in clause:
                relation, target = clause["position"]
                if relation not in RELATIONS or not (kind == "include" and isinstance(target, int) and 0 <= target < k):
                    raise ValueError(f"{at}: position {clause['position']!r}: expected [one of {list(RELATIONS)}, "
                                     "the index of an earlier include clause]")
    if not includes:
        raise ValueError(f"{where}: the row has no include clause")
    return row


def read_prompts(uri: str = METADATA) -> list[Prompt]:
    """Every prompt of a GenEval metadata file (JSON lines), checked (module docstring)."""
    names = set(object_names())
    out = []
    for n, line in enumerate(storage.read_bytes(uri).decode("utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{uri} line {n + 1}: not JSON ({e})") from None
        out.append(Prompt(len(out), _check(row, f"{uri} line {n + 1}", names)))
    if not out:
        raise ValueError(f"{uri} holds no prompts")
    return out


def subset(prompts: Sequence[Prompt], per_tag: int | None = None, indices: Sequence[int] | None = None
           ) -> list[Prompt]:
    """The prompts a run draws: all, the first `per_tag` of each tag, or the given indices."""
    if indices is not None:
        bad = [i for i in indices if not 0 <= i < len(prompts)]
        if bad:
            raise ValueError(f"geneval prompt indices {bad} are outside 0..{len(prompts) - 1}")
        return [prompts[i] for i in sorted(set(indices))]
    if per_tag is None:
        return list(prompts)
    counts: dict[str, int] = {}
    chosen = []
    for p in prompts:
        if counts.get(p.tag, 0) < per_tag:
            counts[p.tag] = counts.get(p.tag, 0) + 1
            chosen.append(p)
    return chosen
