"""AvatarWorld: a procedural world of talking people with exact ground truth (DESIGN.md §7).

    from avatarv_jax.data.avatarworld import make_clip, MOTION_DIM
    clip = make_clip(seed=0, identity_id=3, scene_id=5, language="de", duration_s=2.0,
                     resolution=128)

The probe and the metrics (which import JAX) live in ``probe`` and ``metrics``. See
docs/avatarworld.md for the attribute tables, the mouth-track formula and the record format.
"""

from avatarv_jax.data.avatarworld.clip import Clip, frames_for_vae, make_clip
from avatarv_jax.data.avatarworld.identity import (ATTRIBUTE_NAMES, DYNAMIC_STYLE_DIM,
                                                   DYNAMIC_STYLE_FIELDS, NUM_ATTRIBUTES,
                                                   STATIC_ATTRIBUTES, Identity, ids_in_split,
                                                   sample_identity, split_of)
from avatarv_jax.data.avatarworld.motion import MOTION_DIM, MOTION_FIELDS, MOTION_RANGES
from avatarv_jax.data.avatarworld.scene import Scene, sample_scene
from avatarv_jax.data.avatarworld.shards import AvatarWorldDataset, ShardWriter
from avatarv_jax.data.avatarworld.speech import LANGUAGE_CODES, SAMPLE_RATE, FPS, mouth_track

__all__ = [
    "ATTRIBUTE_NAMES", "AvatarWorldDataset", "Clip", "DYNAMIC_STYLE_DIM", "DYNAMIC_STYLE_FIELDS",
    "FPS", "Identity", "LANGUAGE_CODES", "MOTION_DIM", "MOTION_FIELDS", "MOTION_RANGES",
    "NUM_ATTRIBUTES", "SAMPLE_RATE", "STATIC_ATTRIBUTES", "Scene", "ShardWriter",
    "frames_for_vae", "ids_in_split", "make_clip", "mouth_track", "sample_identity",
    "sample_scene", "split_of",
]
