"""Quality filters: which face runs become training clips, and why the others do not.

Each check returns a reason string (the keys counted in the manifest) or ``None``. The order
in ``run_rejection`` is the order of the checks; the first failing one names the rejection.
Thresholds live in ``IngestConfig`` and are tabulated in docs/ingest.md.
"""

from __future__ import annotations

import numpy as np

from avatarv_jax.data.ingest.config import IngestConfig
from avatarv_jax.data.ingest.scenes import grey

NO_FACE = "no_face"
SEVERAL_FACES = "several_faces"
TOO_SHORT = "too_short"
TOO_DARK = "too_dark"
STATIC = "static"
CHOPPY = "choppy"
NO_AUDIO = "no_audio"
REASONS = (NO_FACE, SEVERAL_FACES, TOO_SHORT, TOO_DARK, STATIC, CHOPPY, NO_AUDIO)


def _crop(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    x0, y0 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
    x1, y1 = min(w, int(np.ceil(box[2]))), min(h, int(np.ceil(box[3])))
    return image[y0:max(y0 + 1, y1), x0:max(x0 + 1, x1)]


def face_brightness(frames: np.ndarray, boxes: np.ndarray) -> float:
    """Mean grey level inside the face boxes of a run."""
    return float(np.mean([grey(_crop(f, b)).mean() for f, b in zip(frames, boxes)]))


def face_change(frames: np.ndarray, boxes: np.ndarray) -> float:
    """How much the face region ever changes: the 90th percentile over frames of the mean
    |grey difference| inside the face box (0 for one frame). A percentile, not the mean, so
    that a single jump does not rescue a frozen picture, and repeated frames (choppy video) do
    not make a moving one look frozen."""
    if len(frames) < 2:
        return 0.0
    diffs = [np.abs(grey(_crop(frames[i], boxes[i])) - grey(_crop(frames[i - 1], boxes[i]))).mean()
             for i in range(1, len(frames))]
    return float(np.percentile(diffs, 90))


def duplicate_fraction(diffs: np.ndarray, threshold: float) -> float:
    """Fraction of frames (after the first) that barely differ from the previous one."""
    if len(diffs) < 2:
        return 0.0
    return float(np.mean(np.asarray(diffs[1:]) < threshold))


def run_rejection(frames: np.ndarray, boxes: np.ndarray, face_counts: np.ndarray,
                  diffs: np.ndarray, source_fps: float, cfg: IngestConfig) -> str | None:
    """Why a face run cannot be a clip (``None``: it can). Inputs cover the run's frames:
    ``face_counts`` is -1 where the detector did not run; ``diffs`` from ``frame_differences``
    (the first value, the difference to the frame before the run, is ignored)."""
    if len(frames) < cfg.min_frames:
        return TOO_SHORT
    counted = face_counts[face_counts >= 0]
    if counted.size and np.mean(counted >= 2) > cfg.max_multi_face_fraction:
        return SEVERAL_FACES
    if face_brightness(frames, boxes) < cfg.min_brightness:
        return TOO_DARK
    if face_change(frames, boxes) < cfg.static_threshold:
        return STATIC
    if (source_fps and source_fps < cfg.min_source_fps) or \
            duplicate_fraction(diffs, cfg.duplicate_threshold) > cfg.max_duplicate_fraction:
        return CHOPPY
    return None
