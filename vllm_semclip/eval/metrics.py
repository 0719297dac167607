"""The benchmark's box metrics: whether a crop holds its targets, and the oracle crop."""

from __future__ import annotations

from collections.abc import Sequence

from vllm_semclip.crops import Box


def intersection_area(a: Box, b: Box) -> int:
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def box_contains(outer: Box, inner: Box) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] and outer[3] >= inner[3]


def crop_hit(boxes: Sequence[Sequence[int]], targets: Sequence[Box]) -> bool:
    """Some crop contains every target box (the benchmark's "crop hit")."""
    return any(all(box_contains(tuple(b), t) for t in targets) for b in boxes)


def box_area(box: Box) -> int:
    return max(0, box[2] - box[0]) * max(0, box[3] - box[1])


def oracle_index(candidates: Sequence[Box], targets: Sequence[Box]) -> int:
    """The candidate that best covers the target boxes (the paper's oracle crop).

    Best = covers the largest share of the targets' area; among equals, the smallest
    candidate (the one that shows the targets at the highest resolution); then the first.
    """
    if not candidates:
        raise ValueError("no candidates")
    total = sum(box_area(t) for t in targets) or 1

    def covered(c: Box) -> float:
        return sum(intersection_area(c, t) for t in targets) / total

    return min(range(len(candidates)), key=lambda i: (-round(covered(candidates[i]), 9), box_area(candidates[i]), i))
