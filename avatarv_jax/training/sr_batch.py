"""SFT pipeline batches -> the SR refiner's TrainBatch (DESIGN §4), through the frozen encoders.

The SR stages read SFT batches rendered at the *high* resolution (``data.resolution`` =
``sr_scale`` x the base model's). Inside the jitted step the same frozen VAE encodes

  * the clip at high resolution: the GEN target latents;
  * the clip downscaled by ``sr_scale`` (bilinear, as inference downscales the reference for
    the base model): the base-resolution latents, upsampled back to the high-resolution latent
    grid by ``upsample_base_latents`` -- the function inference's ``_refine`` calls -- and fed
    as the condition (channel-concatenated with the noisy latents, ``cond_latents``);
  * the reference clip at high resolution (REF), with its audio; no motion stream (inference
    runs the refiner without one).

Text and audio go through the frozen encoders exactly as in SFT (``training.batch``).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from avatarv_jax.diffusion.objective import TrainBatch
from avatarv_jax.training.batch import _pixels, _video_frames, clip_features


def upsample_base_latents(base: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Base latents [B, F, h, w, C] -> [B, F, *grid, C] (bilinear): the SR condition, in
    training and in inference alike."""
    b, f, _, _, c = base.shape
    return jax.image.resize(base, (b, f, int(grid[0]), int(grid[1]), c), "linear")


def downscale_frames(video: jax.Array, sr_scale: int) -> jax.Array:
    """Frames [B, T, H, W, 3] in [-1, 1] -> [B, T, H / s, W / s, 3] (bilinear)."""
    b, t, h, w, c = video.shape
    if h % sr_scale or w % sr_scale:
        raise ValueError(f"SR frames {h}x{w} are not divisible by sr_scale {sr_scale}")
    return jax.image.resize(video, (b, t, h // sr_scale, w // sr_scale, c), "linear")


def check_sr_batch(batch: Mapping, sr_scale: int, spatial_stride: int) -> None:
    """Clear errors for a batch the SR stages cannot use (checked on the host, before jit)."""
    missing = [k for k in ("video", "ref_video", "text_ids", "text_mask", "audio", "ref_audio")
               if k not in batch]
    if missing:
        hint = (" (latent-mode batches cannot be used: the base-resolution condition is encoded "
                "from the downscaled pixels)" if "latents" in batch else "")
        raise ValueError(f"SR batch is missing {missing}{hint}; it has {sorted(batch)}")
    h, w = batch["video"].shape[2:4]
    unit = sr_scale * spatial_stride * 2      # the base latent grid must be whole patches
    if h % unit or w % unit:
        raise ValueError(f"SR frames {h}x{w} must be multiples of {unit} (sr_scale {sr_scale} "
                         f"x VAE stride {spatial_stride} x patch 2)")


def encode_sr_batch(frozen: Mapping[str, nnx.Module], batch: Mapping, sr_scale: int
                    ) -> TrainBatch:
    """The SR refiner's TrainBatch (traced inside the train step)."""
    vae = frozen["vae"]
    text = frozen["text_encoder"](batch["text_ids"], batch["text_mask"])
    text = jax.lax.stop_gradient(text * batch["text_mask"][..., None].astype(text.dtype))
    video = _pixels(batch["video"])
    latents = jax.lax.stop_gradient(vae.encode(video))
    base = jax.lax.stop_gradient(vae.encode(downscale_frames(video, sr_scale)))
    ref_latents = jax.lax.stop_gradient(vae.encode(_pixels(batch["ref_video"])))
    out = dict(latents=latents, text=text.astype(jnp.float32),
               cond_latents=upsample_base_latents(base, latents.shape[2:4]),
               audio=clip_features(frozen.get("audio_encoder"), batch["audio"],
                                   _video_frames(latents)),
               ref_latents=ref_latents,
               ref_audio=clip_features(frozen.get("audio_encoder"), batch["ref_audio"],
                                       _video_frames(ref_latents)))
    for name in ("face", "mouth", "eye"):
        key = f"mask_{name}s" if name == "eye" else f"mask_{name}"
        if key in batch:
            out[f"{name}_mask"] = batch[key]
    return TrainBatch(**out)
