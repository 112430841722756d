"""Per-token loss weights from face, mouth and eye masks.

The uniform flow loss spends most of its gradient on background and clothing, which fill most
of the frame; lip shape and blinks are a few tokens. The masks (per video frame) are pooled to
the DiT's token grid and turned into weights that the flow loss multiplies in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def latent_frames(num_video_frames: int, temporal_stride: int = 4) -> int:
    """Latent frames of a causal VAE: the first video frame alone, then one per stride."""
    if num_video_frames < 1 or (num_video_frames - 1) % temporal_stride:
        raise ValueError(f"a clip must have 1 + {temporal_stride}k video frames, got "
                         f"{num_video_frames}")
    return 1 + (num_video_frames - 1) // temporal_stride


def pool_mask_to_tokens(mask: jax.Array, *, temporal_stride: int = 4,
                        spatial_stride: int = 16) -> jax.Array:
    """Max-pool a [B, T, H, W] mask to [B, 1 + (T-1)/stride, H/s, W/s].

    Max, not mean: a token that holds a sliver of the mouth still carries mouth detail, and
    a lip movement in any of the four video frames of a latent frame is in that latent.
    Video frame 0 forms latent frame 0 alone (the causal VAE encodes it by itself).
    """
    if temporal_stride < 1 or spatial_stride < 1:
        raise ValueError(f"strides must be positive, got temporal {temporal_stride} and "
                         f"spatial {spatial_stride}")
    mask = jnp.asarray(mask, jnp.float32)
    if mask.ndim != 4:
        raise ValueError(f"a mask must be [B, T, H, W], got shape {mask.shape}")
    b, t, h, w = mask.shape
    if t < 1 or (t - 1) % temporal_stride:
        raise ValueError(f"mask of shape {mask.shape}: T={t} video frames is not of the form "
                         f"1 + {temporal_stride}k (causal VAE temporal stride)")
    if h % spatial_stride or w % spatial_stride:
        raise ValueError(f"mask of shape {mask.shape}: H={h} and W={w} must be divisible by the "
                         f"spatial stride {spatial_stride} (VAE stride x patch size)")
    first = mask[:, :1]
    rest = mask[:, 1:].reshape(b, (t - 1) // temporal_stride, temporal_stride, h, w)
    frames = jnp.concatenate([first, jnp.max(rest, axis=2)], axis=1)
    hs, ws = h // spatial_stride, w // spatial_stride
    frames = frames.reshape(b, frames.shape[1], hs, spatial_stride, ws, spatial_stride)
    return jnp.max(frames, axis=(3, 5))


def region_token_weights(face: jax.Array | None, mouth: jax.Array | None,
                         eye: jax.Array | None, *, face_weight: float, mouth_weight: float,
                         eye_weight: float, temporal_stride: int = 4,
                         spatial_stride: int = 16) -> jax.Array:
    """Loss weights [B, F_lat, H/s, W/s, 1]: ``1 + face_w*face + mouth_w*mouth + eye_w*eye``.

    Masks are [B, T_video, H, W] in [0, 1] (bool or soft). The weights add, so a mouth token,
    which is also a face token, gets ``1 + face_weight + mouth_weight``. A mask given as None
    counts as empty. The trailing axis of 1 broadcasts over latent channels in ``flow_loss``.
    """
    masks = {"face": (face, face_weight), "mouth": (mouth, mouth_weight),
             "eye": (eye, eye_weight)}
    given = {name: m for name, (m, _) in masks.items() if m is not None}
    if not given:
        raise ValueError("region_token_weights needs at least one of face, mouth, eye")
    shapes = {name: tuple(jnp.shape(m)) for name, m in given.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"face, mouth and eye masks must share one shape, got {shapes}")
    weights = None
    for name, (mask, weight) in masks.items():
        if mask is None:
            continue
        pooled = pool_mask_to_tokens(mask, temporal_stride=temporal_stride,
                                     spatial_stride=spatial_stride)
        term = weight * pooled
        weights = term if weights is None else weights + term
    return (1.0 + weights)[..., None]
