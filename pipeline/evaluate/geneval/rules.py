"""GenEval's verdict on one image, model-free: detections per class + a colour classifier + a prompt's metadata ->
(correct, reason). The protocol is GenEval's (Ghosh et al. 2023, djghosh13/geneval evaluation/evaluate_images.py),
restated here:

- kept detections: per class, those scoring above 0.3 (0.9 for counting prompts), most confident first, at most 16;
  no suppression of overlapping boxes (its overlap threshold is 1.0);
- include clause {class, count[, color][, position: [relation, group]]}: at least `count` kept detections; the
  `count` most confident must all have the colour (when one is asked), and every one of them must stand in the
  relation to every detection of the clause group it refers to (which must itself have been met);
- exclude clause {class, count}: fewer than `count` kept detections;
- position: box centres, the offset shrunk by 0.1 x the sum of the two boxes' sizes per axis (never past zero), then
  normalised by the offset's length: left of / right of when x < -0.5 / > 0.5, above / below when y < -0.5 / > 0.5;
- an image is correct when every include clause is met and no exclude clause is hit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
POSITION_THRESHOLD = 0.1
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")


@dataclass
class Detection:
    """One detected instance: box (x1, y1, x2, y2) in pixels, score, and its mask (H, W) bool when the detector
    segments."""

    box: tuple[float, float, float, float]
    score: float
    mask: np.ndarray | None = field(default=None, repr=False)


# (image, detections of one class, the class name) -> one colour name per detection
ColourClassifier = Callable[[object, Sequence[Detection], str], Sequence[str]]


def keep(detections: Mapping[str, Sequence[Detection]], tag: str) -> dict[str, list[Detection]]:
    """The detections the protocol keeps (module docstring), per class; classes left with none are dropped."""
    threshold = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    kept = {}
    for name, found in detections.items():
        ranked = sorted((d for d in found if d.score > threshold), key=lambda d: d.score, reverse=True)
        if ranked:
            kept[name] = ranked[:MAX_OBJECTS]
    return kept


def relative_position(a: Detection, b: Detection) -> set[str]:
    """The relations of A to B (module docstring): a subset of RELATIONS."""
    boxes = np.array([a.box, b.box], dtype=np.float64).reshape(2, 2, 2)  # (object, corner, xy)
    centre_a, centre_b = boxes.mean(axis=1)
    size_a, size_b = np.abs(boxes[:, 1] - boxes[:, 0])
    offset = centre_a - centre_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (size_a + size_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    found = set()
    if dx < -0.5:
        found.add("left of")
    if dx > 0.5:
        found.add("right of")
    if dy < -0.5:
        found.add("above")
    if dy > 0.5:
        found.add("below")
    return found


def verdict(image, detections: Mapping[str, Sequence[Detection]], metadata: Mapping,
            colour_of: ColourClassifier) -> tuple[bool, str]:
    """(correct, reason) for one image whose kept detections (`keep`) are `detections`."""
    correct, reasons, groups = True, [], []
    for clause in metadata.get("include", []):
        name, count = clause["class"], clause["count"]
        found = list(detections.get(name, []))[:count]
        met = True
        if len(found) < count:
            met = False
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in clause:
                colours = list(colour_of(image, found, name))
                if colours.count(clause["color"]) < count:
                    met = False
                    seen = ", ".join(f"{colours.count(c)} {c}" for c in COLORS if c in colours)
                    reasons.append(f"expected {clause['color']} {name}>={count}, found "
                                   f"{colours.count(clause['color'])} {clause['color']}; and {seen}")
            if "position" in clause and met:
                relation, target = clause["position"]
                if groups[target] is None:
                    met = False
                    reasons.append(f"no target for {name} to be {relation}")
                else:
                    for obj in found:
                        bad = next((other for other in groups[target]
                                    if relation not in relative_position(obj, other)), None)
                        if bad is not None:
                            met = False
                            reasons.append(f"expected {name} {relation} target, found "
                                           f"{' and '.join(sorted(relative_position(obj, bad)))} target")
                            break
        correct = correct and met
        groups.append(found if met else None)
    for clause in metadata.get("exclude", []):
        name, count = clause["class"], clause["count"]
        if len(detections.get(name, [])) >= count:
            correct = False
            reasons.append(f"expected {name}<{count}, found {len(detections[name])}")
    return correct, "\n".join(reasons)
