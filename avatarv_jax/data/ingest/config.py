"""Every knob of real-video ingestion in one frozen dataclass (thresholds documented in docs/ingest.md).

The values are stored in the manifest, so a data set says how it was made; the CLI exposes the
common ones as flags. Frame-difference thresholds are in grey levels (0-255) of the normalised
frames.
"""

from __future__ import annotations

import dataclasses
from typing import Any

FPS = 25                       # output frame rate (the model's)
SAMPLE_RATE = 16000            # output audio rate, mono
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS   # 640
VIDEO_EXTENSIONS = (".mp4", ".mov", ".webm", ".mkv", ".m4v")


@dataclasses.dataclass(frozen=True)
class IngestConfig:
    # normalisation
    longest_side: int = 256          # frames are resized so that max(H, W) == this ...
    size_multiple: int = 16          # ... and both sides are rounded to a multiple of this
    max_source_seconds: float = 600.0  # longer sources are read up to here only
    # scene cuts (scenes.py)
    cut_threshold: float = 30.0      # mean |grey difference| of 32x32 thumbnails at a cut
    cut_ratio: float = 3.0           # ... and this many times the median difference around it
    # face track (faces.py)
    detector_upsample: int = 1       # dlib pyramid upsampling: 1 finds faces down to ~40 px
    detector_threshold: float = 0.0  # dlib detection score threshold
    detect_every: int = 2            # run the detector on every n-th frame, interpolate between
    max_track_jump: float = 0.5      # a box moving more than this x its size between detections
                                     # starts a new track (a different face)
    embedding_frames: int = 4        # frames averaged into the 128-d face embedding
    background_frames: int = 9       # frames the background descriptor is computed over
    # filters (filters.py)
    min_seconds: float = 1.0         # shorter face runs are dropped ("too_short")
    max_clip_seconds: float = 10.0   # longer runs are split into clips of at most this
    max_multi_face_fraction: float = 0.2  # detections with >= 2 faces ("several_faces")
    min_face_fraction: float = 0.1   # a scene whose face covers fewer frames is "no_face"
    min_brightness: float = 40.0     # mean grey level of the face region ("too_dark")
    min_shot_brightness: float = 20.0  # mean grey level of a whole shot, checked before the
                                       # face track (the detector fails in the dark)
    static_threshold: float = 0.3    # 90th pct. |grey difference| inside the face ("static")
    duplicate_threshold: float = 0.05  # a frame this close to the previous one is a duplicate
    max_duplicate_fraction: float = 0.35  # more duplicates than this is "choppy"
    min_source_fps: float = 15.0     # sources below this frame rate are "choppy"
    require_audio: bool = True       # sources without an audio stream are "no_audio"
    # records
    caption: str = "a person talking to the camera"  # used when no <video>.txt sidecar exists

    def __post_init__(self):
        positive = ("longest_side", "size_multiple", "detect_every", "embedding_frames",
                "background_frames",
                    "min_seconds", "max_clip_seconds", "max_source_seconds")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"IngestConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.longest_side % self.size_multiple:
            raise ValueError(f"longest_side {self.longest_side} must be a multiple of "
                             f"size_multiple {self.size_multiple}")
        if self.max_clip_seconds < self.min_seconds:
            raise ValueError("max_clip_seconds must be >= min_seconds")
        if self.detector_upsample < 0:
            raise ValueError(f"detector_upsample must be >= 0, got {self.detector_upsample}")

    @property
    def min_frames(self) -> int:
        return round(self.min_seconds * FPS)

    @property
    def max_clip_frames(self) -> int:
        return round(self.max_clip_seconds * FPS)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class GraphOptions:
    """Thresholds of the identity graph built over the ingested clips (identity_graph.py).

    ``face_threshold`` 0.82 is dlib's usual same-person rule (Euclidean distance < 0.6 between
    descriptors) in cosine terms for unit vectors (1 - 0.6**2 / 2). Graph options may change
    between runs: the graph is rebuilt from the stored features every time.
    """

    face_threshold: float = 0.82
    background_threshold: float = 0.985
    min_frames: int = 25
