"""Frame differencing: scene cuts, and the per-frame change measures the filters use.

Differences are computed on small grey thumbnails (32 x 32, area-averaged), which ignores
compression noise and costs almost nothing. A cut is a jump that is large in absolute terms
(``cut_threshold`` grey levels) *and* large against the motion around it (``cut_ratio`` times
the median difference of the 8 frames either side, repeated frames left out), so fast pans
and zooms are not cut while a hard cut between two shots always is.
"""

from __future__ import annotations

import itertools

import numpy as np

THUMB = 32
_CONTEXT = 8
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_REPEAT = 0.5   # differences below this (grey levels) are repeated frames, not motion


def grey(frames: np.ndarray) -> np.ndarray:
    """float32 [..., H, W] luma (BT.601) in grey levels 0-255."""
    return np.asarray(frames, np.float32) @ _LUMA


def thumbnails(frames: np.ndarray, size: int = THUMB) -> np.ndarray:
    """float32 [T, size, size] grey thumbnails by block averaging (edges cropped to fit).

    The blocks are summed in integers before the colour weights are applied: the same numbers
    as ``grey`` then averaging, at a tenth of the cost (no float copy of every pixel)."""
    frames = np.asarray(frames)
    t, h, w, _ = frames.shape
    bh, bw = max(1, h // size), max(1, w // size)
    rows, cols = min(size, h // bh), min(size, w // bw)
    x = frames[:, :rows * bh, :cols * bw].reshape(t, rows, bh, cols * bw * 3)
    x = x.sum(axis=2, dtype=np.uint32).reshape(t, rows, cols, bw, 3).sum(axis=3, dtype=np.uint32)
    return (x.astype(np.float32) @ _LUMA) / np.float32(bh * bw)


def frame_differences(frames: np.ndarray) -> np.ndarray:
    """float32 [T]: mean |thumbnail difference| to the previous frame (0 for frame 0)."""
    return thumbnail_differences(thumbnails(frames))


def thumbnail_differences(thumbs: np.ndarray) -> np.ndarray:
    """``frame_differences`` from thumbnails already made."""
    d = np.zeros(len(thumbs), np.float32)
    if len(thumbs) > 1:
        d[1:] = np.abs(np.diff(thumbs, axis=0)).mean(axis=(1, 2))
    return d


def find_cuts(diffs: np.ndarray, threshold: float, ratio: float) -> np.ndarray:
    """int64 [C]: frame indices that start a new shot (never 0)."""
    diffs = np.asarray(diffs, np.float32)
    cuts = []
    for i in np.flatnonzero(diffs > threshold):
        if i == 0:
            continue
        around = np.concatenate([diffs[max(1, i - _CONTEXT):i], diffs[i + 1:i + 1 + _CONTEXT]])
        around = around[around >= _REPEAT]
        base = float(np.median(around)) if around.size else 0.0
        if diffs[i] > ratio * base:
            cuts.append(int(i))
    return np.asarray(cuts, np.int64)


def split_scenes(num_frames: int, cuts: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) frame spans between cuts."""
    edges = [0, *sorted(int(c) for c in cuts if 0 < c < num_frames), num_frames]
    return [(a, b) for a, b in itertools.pairwise(edges) if b > a]
