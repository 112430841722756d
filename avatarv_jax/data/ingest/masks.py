"""Face, mouth and eye masks drawn from the 68 landmarks (the region weights of the loss).

Each region is a convex polygon filled on the pixel grid (a pixel is in when its centre is):

* face: the hull of the jaw line and the brows, with the brows repeated 0.6 IOD higher along
  the face's up direction to take in the forehead;
* mouth: the hull of the outer lip contour, grown by 15 % around its centre;
* eyes: per eye, the hull of its 6 points grown by 50 % and at least 0.2 IOD tall (so a shut
  eye still has a region).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import ConvexHull, QhullError

from avatarv_jax.data.ingest.landmark_motion import (
    JAW,
    LEFT_BROW,
    LEFT_EYE,
    OUTER_LIPS,
    RIGHT_BROW,
    RIGHT_EYE,
    eye_centres,
)

FOREHEAD = 0.6
MOUTH_GROW = 1.15
EYE_GROW = 1.5
EYE_MIN_HEIGHT = 0.2


def fill_convex(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """bool [H, W]: pixels whose centres lie inside the convex hull of ``points`` [N, 2] (x, y)."""
    mask = np.zeros((height, width), bool)
    points = np.asarray(points, np.float64)
    try:
        hull = ConvexHull(points)
    except (QhullError, ValueError):  # fewer than 3 distinct points or all on a line
        return mask
    x0, y0 = np.floor(points.min(0)).astype(int)
    x1, y1 = np.ceil(points.max(0)).astype(int)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1 + 1, width), min(y1 + 1, height)
    if x0 >= x1 or y0 >= y1:
        return mask
    ys, xs = np.mgrid[y0:y1, x0:x1]
    pix = np.stack([xs + 0.5, ys + 0.5], -1).reshape(-1, 2)
    # hull.equations: rows (a, b, c) with a x + b y + c <= 0 inside
    inside = (pix @ hull.equations[:, :2].T + hull.equations[:, 2] <= 1e-9).all(axis=1)
    mask[y0:y1, x0:x1] = inside.reshape(ys.shape)
    return mask


def _grow(points: np.ndarray, factor: float) -> np.ndarray:
    c = points.mean(0)
    return c + (points - c) * factor


def region_masks(landmarks: np.ndarray, frame_size: tuple[int, int]) -> dict[str, np.ndarray]:
    """{'face', 'mouth', 'eyes'}: bool [T, H, W] from pixel landmarks [T, 68, 2]."""
    landmarks = np.asarray(landmarks, np.float64)
    h, w = frame_size
    t = landmarks.shape[0]
    out = {name: np.zeros((t, h, w), bool) for name in ("face", "mouth", "eyes")}
    right, left = eye_centres(landmarks)
    for i, lm in enumerate(landmarks):
        d = left[i] - right[i]
        iod = max(float(np.linalg.norm(d)), 1e-6)
        up = np.array([d[1], -d[0]]) / iod            # perpendicular to the eye line, upwards
        brows = np.concatenate([lm[RIGHT_BROW], lm[LEFT_BROW]])
        face = np.concatenate([lm[JAW], brows, brows + FOREHEAD * iod * up])
        out["face"][i] = fill_convex(face, h, w)
        out["mouth"][i] = fill_convex(_grow(lm[OUTER_LIPS], MOUTH_GROW), h, w)
        for eye in (lm[RIGHT_EYE], lm[LEFT_EYE]):
            c = eye.mean(0)
            pts = np.concatenate([_grow(eye, EYE_GROW), [c + EYE_MIN_HEIGHT / 2 * iod * up,
                                                         c - EYE_MIN_HEIGHT / 2 * iod * up]])
            out["eyes"][i] |= fill_convex(pts, h, w)
    return out
