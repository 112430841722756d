"""One source video -> clips: decode, cut into shots, track the face, filter, measure.

This is the unit of work both runners share (``plain.py`` loops over it, ``beam.py`` maps it
over a PCollection); it touches no output files, so the two runners write identical shards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
from collections import Counter
from typing import Any

import numpy as np

from avatarv_jax.data.ingest import (
    faces,
    filters,
    landmark_motion,
    masks,
    scenes,
    video,
)
from avatarv_jax.data.ingest.config import SAMPLES_PER_FRAME, IngestConfig

OK, CORRUPT = "ok", "corrupt"
HASH_PREFIX = 16   # hex digits of the content hash that name a source's shard


@dataclasses.dataclass
class Clip:
    """A training clip (record arrays) and its manifest entry."""

    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]


@dataclasses.dataclass
class SourceResult:
    source: str                     # path relative to the input directory ("/"-separated)
    digest: str                     # sha256 of the file's bytes
    status: str                     # OK or CORRUPT
    error: str = ""
    clips: list[Clip] = dataclasses.field(default_factory=list)
    rejected: dict[str, int] = dataclasses.field(default_factory=dict)
    num_frames: int = 0             # normalised frames decoded
    num_shots: int = 0


def file_digest(stream, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a binary stream (the identity of a source: renames keep it)."""
    h = hashlib.sha256()
    while block := stream.read(chunk):
        h.update(block)
    return h.hexdigest()


def source_key(digest: str) -> str:
    return digest[:HASH_PREFIX]


def caption_for(local_path: str, cfg: IngestConfig) -> str:
    """The text of ``<video>.txt`` beside the video when present, else ``cfg.caption``."""
    side = os.path.splitext(local_path)[0] + ".txt"
    if os.path.isfile(side):
        with open(side, encoding="utf-8") as f:
            return clean_caption(f.read(), cfg)
    return cfg.caption


def clean_caption(text: str, cfg: IngestConfig) -> str:
    """Whitespace collapsed to single spaces; an empty caption falls back to ``cfg.caption``."""
    return " ".join(text.split()) or cfg.caption


def _pieces(start: int, end: int, max_len: int) -> list[tuple[int, int]]:
    """[start, end) cut into the fewest near-equal pieces of at most ``max_len`` frames."""
    n = end - start
    k = max(1, -(-n // max_len))
    edges = [start + (n * i) // k for i in range(k + 1)]
    return list(itertools.pairwise(edges))


def process_source(local_path: str, source: str, digest: str, cfg: IngestConfig,
                   models: faces.FaceModels, caption: str | None = None) -> SourceResult:
    """All clips of one file. Unreadable files give ``status=CORRUPT`` and the error text."""
    result = SourceResult(source=source, digest=digest, status=OK)
    try:
        footage = video.decode(local_path, cfg)
    except video.CorruptVideoError as e:
        result.status, result.error = CORRUPT, str(e).replace(local_path, source)
        return result
    rejected: Counter[str] = Counter()
    result.num_frames = footage.num_frames
    if cfg.require_audio and not footage.has_audio:
        rejected[filters.NO_AUDIO] += 1
        result.rejected = dict(rejected)
        return result
    frames = footage.frames
    h, w = frames.shape[1:3]
    caption = caption if caption is not None else caption_for(local_path, cfg)
    thumbs = scenes.thumbnails(frames)
    diffs = scenes.thumbnail_differences(thumbs)
    shots = scenes.split_scenes(len(frames), scenes.find_cuts(diffs, cfg.cut_threshold,
                                                              cfg.cut_ratio))
    result.num_shots = len(shots)
    for a, b in shots:
        if thumbs[a:b].mean() < cfg.min_shot_brightness:
            rejected[filters.TOO_DARK] += 1
            continue
        track = faces.track_faces(frames[a:b], models, cfg)
        if track.present.mean() < cfg.min_face_fraction:
            rejected[filters.NO_FACE] += 1
            continue
        for ra, rb in track.runs():
            for pa, pb in _pieces(ra, rb, cfg.max_clip_frames):
                s, e = a + pa, a + pb
                boxes = track.boxes[pa:pb]
                reason = filters.run_rejection(frames[s:e], boxes, track.face_counts[pa:pb],
                                               diffs[s:e], footage.source_fps, cfg)
                if reason is not None:
                    rejected[reason] += 1
                    continue
                result.clips.append(_make_clip(frames[s:e], footage.audio, s, boxes, models,
                                               cfg, source, digest, len(result.clips),
                                               caption, (h, w)))
    result.rejected = dict(sorted(rejected.items()))
    return result


def _make_clip(frames: np.ndarray, audio: np.ndarray, start: int, boxes: np.ndarray,
               models: faces.FaceModels, cfg: IngestConfig, source: str, digest: str,
               index: int, caption: str, size: tuple[int, int]) -> Clip:
    from avatarv_jax.data.identity_graph import background_descriptor, evenly_spaced

    t = len(frames)
    landmarks = faces.track_landmarks(frames, boxes, models)
    motion = landmark_motion.motion_from_landmarks(landmarks, size)
    regions = masks.region_masks(landmarks, size)
    embedding = faces.track_embedding(frames, boxes, models, cfg.embedding_frames)
    sel = evenly_spaced(t, cfg.background_frames)   # as identity_graph does for AvatarWorld
    background = background_descriptor(frames[sel], regions["face"][sel])
    clip_id = f"{source_key(digest)}-{index:03d}"
    arrays = {
        "frames": frames, "motion": motion, "audio":
            audio[start * SAMPLES_PER_FRAME:(start + t) * SAMPLES_PER_FRAME].astype(np.float32),
        "mask_face": regions["face"], "mask_mouth": regions["mouth"], "mask_eyes": regions["eyes"],
        "landmarks": landmarks, "face_boxes": boxes.astype(np.float32),
        "face_embedding": embedding, "background": background,
    }
    meta = {"clip_id": clip_id, "source": source, "start_frame": int(start), "num_frames": t,
            "height": size[0], "width": size[1], "identity_id": -1, "caption": caption,
            "face_embedding": [float(v) for v in embedding],
            "background": [float(v) for v in background]}
    return Clip(arrays=arrays, meta=meta)
