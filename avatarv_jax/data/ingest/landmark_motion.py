"""The real-video motion vector: what moves in a talking face, read from dlib's 68 landmarks.

Landmarks (iBUG 300-W order: jaw 0-16, brows 17-26, nose 27-35, eyes 36-47, lips 48-67; "right"
is the subject's right, on the image's left) are first put in a *face frame*: the midpoint of
the two eye centres at the origin, the eye line horizontal, and the inter-ocular distance (IOD,
between eye centres) as the unit. Shape features measured there do not change when the head
moves, turns in the image plane or comes closer; the pose and placement are kept as separate
fields. ``REAL_MOTION_FIELDS`` is the order of the vector (``REAL_MOTION_DIM`` = 13 floats per
frame); docs/ingest.md has the table with typical values.

Head yaw and pitch come from 2D landmarks without a 3D model, so they are monotone proxies,
not angles: yaw from the nose tip's position between the two cheek contours (-1..1), pitch
from the nose tip's height between the eye line and the chin.
"""

from __future__ import annotations

import numpy as np

REAL_MOTION_FIELDS: tuple[str, ...] = (
    "mouth_open",      # inner-lip gap (mean of 3 vertical pairs) / IOD; 0 = lips together
    "mouth_width",     # mouth-corner distance / IOD; smaller = rounded lips, larger = spread/smile
    "smile",           # lip-centre height minus mouth-corner height / IOD; > 0 = corners up
    "eye_open_right",  # eye aspect ratio of the subject's right eye (~0.3 open, <0.15 shut)
    "eye_open_left",   # ... and the left eye
    "brow_right",      # eye-centre to brow height / IOD (brow raise)
    "brow_left",
    "head_yaw",        # -1..1 proxy; > 0 = face turned towards the image's right
    "head_pitch",      # (nose tip - eye line) / (chin - eye line) height; larger = nodding down
    "head_roll",       # eye-line angle in radians; > 0 = tilted clockwise in the image
    "face_x",          # eye midpoint, -1 (left edge) .. 1 (right edge) of the frame
    "face_y",          # eye midpoint, -1 (top) .. 1 (bottom)
    "face_scale",      # IOD / the frame's longest side (zoom)
)
REAL_MOTION_DIM = len(REAL_MOTION_FIELDS)

JAW, RIGHT_BROW, LEFT_BROW = slice(0, 17), slice(17, 22), slice(22, 27)
RIGHT_EYE, LEFT_EYE, OUTER_LIPS, INNER_LIPS = slice(36, 42), slice(42, 48), slice(48, 60), \
    slice(60, 68)
NOSE_TIP, CHIN = 30, 8


def eye_centres(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([..., 2], [..., 2]): centres of the subject's right and left eye."""
    return landmarks[..., RIGHT_EYE, :].mean(-2), landmarks[..., LEFT_EYE, :].mean(-2)


def face_frame(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(normalised [T, 68, 2], eye midpoint [T, 2], IOD [T], roll [T]) of pixel landmarks."""
    lm = np.asarray(landmarks, np.float64)
    right, left = eye_centres(lm)
    mid = (right + left) / 2
    d = left - right                                  # points to the image's right
    iod = np.maximum(np.linalg.norm(d, axis=-1), 1e-6)
    roll = np.arctan2(d[..., 1], d[..., 0])           # y is down: > 0 is clockwise
    c, s = np.cos(-roll), np.sin(-roll)
    rel = lm - mid[..., None, :]
    x = c[..., None] * rel[..., 0] - s[..., None] * rel[..., 1]
    y = s[..., None] * rel[..., 0] + c[..., None] * rel[..., 1]
    return np.stack([x, y], -1) / iod[..., None, None], mid, iod, roll


def _eye_aspect(eye: np.ndarray) -> np.ndarray:
    """Eye aspect ratio of [T, 6, 2] eye landmarks: lid gap over eye width."""
    gap = (np.linalg.norm(eye[:, 1] - eye[:, 5], axis=-1)
           + np.linalg.norm(eye[:, 2] - eye[:, 4], axis=-1)) / 2
    return gap / np.maximum(np.linalg.norm(eye[:, 3] - eye[:, 0], axis=-1), 1e-6)


def motion_from_landmarks(landmarks: np.ndarray, frame_size: tuple[int, int]) -> np.ndarray:
    """float32 [T, REAL_MOTION_DIM] from pixel landmarks [T, 68, 2] of frames (H, W)."""
    landmarks = np.asarray(landmarks, np.float64)
    if landmarks.ndim != 3 or landmarks.shape[1:] != (68, 2):
        raise ValueError(f"landmarks must be [T, 68, 2], got {landmarks.shape}")
    h, w = frame_size
    n, mid, iod, roll = face_frame(landmarks)
    inner = n[:, INNER_LIPS]                          # 60..67
    mouth_open = np.mean([inner[:, 7, 1] - inner[:, 1, 1], inner[:, 6, 1] - inner[:, 2, 1],
                          inner[:, 5, 1] - inner[:, 3, 1]], axis=0)
    outer = n[:, OUTER_LIPS]                          # 48..59; corners 48 (0) and 54 (6)
    mouth_width = np.linalg.norm(outer[:, 6] - outer[:, 0], axis=-1)
    centre_y = (outer[:, 3, 1] + outer[:, 9, 1]) / 2  # 51 (top centre) and 57 (bottom centre)
    corner_y = (outer[:, 0, 1] + outer[:, 6, 1]) / 2
    smile = centre_y - corner_y
    eye_r, eye_l = n[:, RIGHT_EYE], n[:, LEFT_EYE]
    brow_r = eye_r[..., 1].mean(-1) - n[:, RIGHT_BROW, 1].mean(-1)
    brow_l = eye_l[..., 1].mean(-1) - n[:, LEFT_BROW, 1].mean(-1)
    nose = n[:, NOSE_TIP]
    to_right_cheek = nose[:, 0] - n[:, 1:3, 0].mean(-1)   # jaw points 1, 2: image-left contour
    to_left_cheek = n[:, 14:16, 0].mean(-1) - nose[:, 0]
    yaw = (to_right_cheek - to_left_cheek) / np.maximum(to_right_cheek + to_left_cheek, 1e-6)
    pitch = nose[:, 1] / np.maximum(n[:, CHIN, 1], 1e-6)
    out = np.stack([
        np.maximum(mouth_open, 0.0), mouth_width, smile,
        _eye_aspect(eye_r), _eye_aspect(eye_l), brow_r, brow_l,
        np.clip(yaw, -1.0, 1.0), pitch, roll,
        2 * mid[:, 0] / w - 1, 2 * mid[:, 1] / h - 1, iod / max(h, w),
    ], axis=1)
    return out.astype(np.float32)
