"""The face track of a shot with dlib: detections, a single-face track, 68 landmarks, embedding.

dlib comes from the ``faces`` extra (``dlib-bin`` wheels plus ``face_recognition_models`` for the
68-point shape predictor and the 128-d ResNet face descriptor). The HOG frontal detector runs
on every ``detect_every``-th frame; boxes are interpolated linearly in between, and the shape
predictor then places the landmarks on every frame, which absorbs the small error of the
interpolation. The track follows one face: at each detection it keeps the face closest to the
previous box, and a jump larger than ``max_track_jump`` box sizes breaks the track (another
person, or a cut the scene detector missed).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import numpy as np

from avatarv_jax.data.ingest.config import IngestConfig

NUM_LANDMARKS = 68
EMBEDDING_DIM = 128
FACES_EXTRA_HINT = ("face tracking needs the `faces` extra: pip install 'avatarv-jax[faces]' "
                    "(dlib-bin, face_recognition_models, setuptools<81)")


def faces_available() -> bool:
    """True when dlib and the face_recognition_models weights can be imported."""
    try:
        _dlib_modules()
    except ImportError:
        return False
    return True


def _dlib_modules():
    try:
        import dlib
        with warnings.catch_warnings():  # face_recognition_models still imports pkg_resources
            warnings.simplefilter("ignore")
            import face_recognition_models
    except ImportError as e:
        raise ImportError(FACES_EXTRA_HINT) from e
    return dlib, face_recognition_models


class FaceModels:
    """dlib's detector, 68-point shape predictor and face descriptor, loaded once per process."""

    def __init__(self):
        dlib, weights = _dlib_modules()
        self._dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(weights.pose_predictor_model_location())
        self.encoder = dlib.face_recognition_model_v1(weights.face_recognition_model_location())

    def detect(self, image: np.ndarray, upsample: int, threshold: float) -> np.ndarray:
        """float32 [N, 4] boxes (x0, y0, x1, y1), highest score first."""
        rects, scores, _ = self.detector.run(np.ascontiguousarray(image), upsample, threshold)
        order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
        boxes = [(r.left(), r.top(), r.right() + 1, r.bottom() + 1) for r in rects]
        return np.asarray(boxes, np.float32).reshape(-1, 4)[order]

    def _shape(self, image: np.ndarray, box: np.ndarray):
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        return self.predictor(image, self._dlib.rectangle(x0, y0, x1 - 1, y1 - 1))

    def landmarks(self, image: np.ndarray, box: np.ndarray) -> np.ndarray:
        """float32 [68, 2] (x, y) pixel coordinates, iBUG 300-W order."""
        shape = self._shape(np.ascontiguousarray(image), box)
        return np.asarray([(p.x, p.y) for p in shape.parts()], np.float32)

    def embedding(self, image: np.ndarray, box: np.ndarray) -> np.ndarray:
        """float32 [128]: dlib's face descriptor (same person: Euclidean distance < ~0.6)."""
        image = np.ascontiguousarray(image)
        return np.asarray(self.encoder.compute_face_descriptor(image, self._shape(image, box)),
                          np.float32)


@functools.cache
def shared_models() -> FaceModels:
    return FaceModels()


@dataclasses.dataclass(frozen=True)
class FaceTrack:
    boxes: np.ndarray        # float32 [T, 4] (x0, y0, x1, y1); NaN where there is no face
    track_id: np.ndarray     # int32 [T]: which unbroken track a frame belongs to; -1 = none
    face_counts: np.ndarray  # int32 [T]: faces found on detection frames, -1 elsewhere

    @property
    def present(self) -> np.ndarray:
        return self.track_id >= 0

    def runs(self) -> list[tuple[int, int]]:
        """[start, end) spans of consecutive frames on one track."""
        out, start = [], None
        ids = self.track_id
        for i in range(len(ids) + 1):
            cur = ids[i] if i < len(ids) else -1
            if start is not None and cur != ids[start]:
                out.append((start, i))
                start = None
            if start is None and cur >= 0:
                start = i
        return out


def _size(box: np.ndarray) -> float:
    return float(np.sqrt(max(1.0, (box[2] - box[0]) * (box[3] - box[1]))))


def _centre(box: np.ndarray) -> np.ndarray:
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2], np.float32)


def detection_frames(num_frames: int, every: int) -> np.ndarray:
    """Frames the detector runs on: every ``every``-th one and always the last."""
    idx = np.arange(0, num_frames, every)
    if num_frames and idx[-1] != num_frames - 1:
        idx = np.append(idx, num_frames - 1)
    return idx


def track_faces(frames: np.ndarray, models: FaceModels, cfg: IngestConfig) -> FaceTrack:
    """One face followed through a shot (see the module docstring)."""
    t = len(frames)
    boxes = np.full((t, 4), np.nan, np.float32)
    track_id = np.full(t, -1, np.int32)
    counts = np.full(t, -1, np.int32)
    prev: np.ndarray | None = None      # box at the previous detection frame (None: lost)
    prev_frame = -1
    current = -1
    next_id = 0
    for i in detection_frames(t, cfg.detect_every):
        found = models.detect(frames[i], cfg.detector_upsample, cfg.detector_threshold)
        counts[i] = len(found)
        if not len(found):
            prev = None
            continue
        if prev is None:
            chosen, continues = found[0], False
        else:
            dist = np.linalg.norm([_centre(b) - _centre(prev) for b in found], axis=1)
            j = int(np.argmin(dist))
            chosen = found[j]
            continues = dist[j] <= cfg.max_track_jump * _size(prev) * (i - prev_frame) \
                / cfg.detect_every
        if not continues:
            current, next_id = next_id, next_id + 1
        elif i - prev_frame > 1:
            w = ((np.arange(prev_frame + 1, i) - prev_frame) / (i - prev_frame))[:, None]
            boxes[prev_frame + 1:i] = (1 - w) * prev[None] + w * chosen[None]
            track_id[prev_frame + 1:i] = current
        boxes[i] = chosen
        track_id[i] = current
        prev, prev_frame = chosen, i
    return FaceTrack(boxes=boxes, track_id=track_id, face_counts=counts)


def track_landmarks(frames: np.ndarray, boxes: np.ndarray, models: FaceModels) -> np.ndarray:
    """float32 [T, 68, 2] landmarks on every frame of a run (boxes must all be present)."""
    if np.isnan(boxes).any():
        raise ValueError("every frame of a run needs a face box")
    return np.stack([models.landmarks(f, b) for f, b in zip(frames, boxes)])


def track_embedding(frames: np.ndarray, boxes: np.ndarray, models: FaceModels,
                    count: int) -> np.ndarray:
    """float32 [128]: the mean dlib descriptor over ``count`` evenly spaced frames of a run."""
    sel = np.unique(np.linspace(0, len(frames) - 1, count).round().astype(np.int64))
    return np.mean([models.embedding(frames[i], boxes[i]) for i in sel], axis=0).astype(np.float32)
