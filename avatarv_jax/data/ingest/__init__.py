"""Real-video ingestion: users' own footage -> training clips in ArrayRecord shards.

``python -m avatarv_jax.data.ingest --input DIR --output DIR`` (see ``__main__``). Steps:
``video`` (decode, 25 fps, resize, 16 kHz mono) -> ``scenes`` (cuts) -> ``faces`` (dlib track,
68 landmarks, 128-d embedding) -> ``filters`` -> ``landmark_motion`` (the motion vector) and
``masks`` -> ``records`` (shards, summaries, manifest, identity graph). ``plain`` runs it in one
process, ``beam`` as an Apache Beam pipeline. docs/ingest.md describes all of it.
"""

from avatarv_jax.data.ingest.config import GraphOptions, IngestConfig
from avatarv_jax.data.ingest.landmark_motion import REAL_MOTION_DIM, REAL_MOTION_FIELDS

__all__ = ["REAL_MOTION_DIM", "REAL_MOTION_FIELDS", "GraphOptions", "IngestConfig"]
