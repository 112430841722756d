"""Frame-aligned audio windows: the audio each latent frame's tokens may attend to.

Audio features arrive at the video frame rate (25 fps), one vector per video frame. Latent
frame ``l`` covers video frames ending at ``4l`` (frame 0 alone for ``l = 0``), so its window is
video frames ``4l - 3 - context .. 4l + context``: the four frames it shows plus ``context``
frames either side. Positions before the start or past the end are zero and masked.
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp

from avatarv_jax.models.motion import TEMPORAL_STRIDE, num_latent_frames


def window_size(context: int) -> int:
    return TEMPORAL_STRIDE + 2 * context


def window_indices(num_video_frames: int, context: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices [F, W] into the video-frame axis, valid mask [F, W]) for every latent frame."""
    f = num_latent_frames(num_video_frames)
    ends = TEMPORAL_STRIDE * np.arange(f)
    idx = ends[:, None] + np.arange(-TEMPORAL_STRIDE + 1 - context, context + 1)[None, :]
    valid = (idx >= 0) & (idx < num_video_frames)
    return np.clip(idx, 0, num_video_frames - 1), valid


def latent_audio_windows(features: jnp.ndarray, context: int):
    """[B, 1 + 4k, Da] per-video-frame features -> ([B, 1 + k, W, Da] windows, [1 + k, W] mask).

    Invalid positions (before frame 0 or after the last frame) are zeroed.
    """
    idx, valid = window_indices(features.shape[1], context)
    windows = features[:, idx] * jnp.asarray(valid, features.dtype)[None, :, :, None]
    return windows, jnp.asarray(valid)
