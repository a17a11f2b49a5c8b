"""Clip lists in the official formats at full size, for scale tests and benchmarks.

The ids are valid YouTube-style ids but made up; the labels are real class ids given by
the caller. Nothing here is used by the pipeline itself.
"""

from __future__ import annotations

from collections.abc import Sequence

_ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _ytid(number: int) -> str:
    """A distinct 11-character id for every number below 64**11."""
    chars = []
    for _ in range(11):
        chars.append(_ID_ALPHABET[number % 64])
        number //= 64
    return "".join(chars)


def audioset_segments(n: int, mids: Sequence[str], first: int = 0) -> str:
    """``n`` rows in the official AudioSet segment format (three '#' lines, spaces, quoted labels)."""
    lines = [
        "# Segments csv created by equiav.data.synthetic",
        f"# num_ytids={n}, num_segs={n}, num_unique_labels={len(mids)}, num_positive_labels={2 * n}",
        "# YTID, start_seconds, end_seconds, positive_labels",
    ]
    for i in range(first, first + n):
        start = i % 300
        labels = f"{mids[i % len(mids)]},{mids[(7 * i + 3) % len(mids)]}"
        lines.append(f'{_ytid(i)}, {start}.000, {start + 10}.000, "{labels}"')
    return "\n".join(lines) + "\n"


def vggsound_list(n: int, labels: Sequence[str], test_share: float = 0.075, first: int = 0) -> str:
    """``n`` rows in VGGSound's ``YTID,start,label,split`` format (labels with commas quoted)."""
    lines = []
    every = max(1, round(1 / test_share))
    for i in range(first, first + n):
        label = labels[i % len(labels)]
        label = f'"{label}"' if "," in label else label
        split = "test" if i % every == 0 else "train"
        lines.append(f"{_ytid(i)},{i % 300},{label},{split}")
    return "\n".join(lines) + "\n"
