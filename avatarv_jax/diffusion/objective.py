"""The flow-matching training objective of the DiT (DESIGN §3.4).

One call: draw a noise level per sample (logit-normal, shifted), noise the GEN latents and
motion (clean prefix frames stay clean), drop conditions for classifier-free guidance, run the
joint forward and return the region-weighted velocity loss plus the motion loss.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from avatarv_jax.diffusion.flow import (noise_latents, prefix_frame_sigma, resolution_shift,
                                        sample_training_sigma, sigma_to_timestep, total_loss,
                                        velocity_target)
from avatarv_jax.diffusion.guidance import ConditionDropout, sample_condition_masks
from avatarv_jax.diffusion.regions import region_token_weights
from avatarv_jax.models.dit import DiT, GenInputs, RefInputs


@struct.dataclass
class TrainBatch:
    """Clean training data of one chunk.

    latents: [B, F, H, W, C] GEN latents; text: [B, L, text_dim]; motion: [B, F, 4M] packed;
    audio: [B, 1 + 4(F-1), audio_dim]; ref_*: the REF segment; face/mouth/eye masks:
    [B, 1 + 4(F-1), sH, sW] per video frame (pixel resolution, s the VAE's spatial stride)
    for the region weights.
    """

    latents: jax.Array
    text: jax.Array
    motion: jax.Array | None = None
    audio: jax.Array | None = None
    ref_latents: jax.Array | None = None
    ref_motion: jax.Array | None = None
    ref_audio: jax.Array | None = None
    face_mask: jax.Array | None = None
    mouth_mask: jax.Array | None = None
    eye_mask: jax.Array | None = None
    cond_latents: jax.Array | None = None   # SR refiner: upsampled base latents [B, F, H, W, C]


def training_shift(flow_cfg, dit: DiT, latents) -> float:
    """The configured shift, or (0) the resolution-dependent one from tokens per frame."""
    if flow_cfg.shift:
        return float(flow_cfg.shift)
    _, ph, pw = dit.cfg.patch_size
    return resolution_shift((latents.shape[2] // ph) * (latents.shape[3] // pw))


def token_pixels(dit: DiT, latents, mask) -> int:
    """Pixels per token side: the VAE's spatial stride (mask width / latent width) x patch."""
    _, _, pw = dit.cfg.patch_size
    if mask.shape[-1] % latents.shape[3]:
        raise ValueError(f"mask width {mask.shape[-1]} is not a multiple of the latent width "
                         f"{latents.shape[3]}")
    return mask.shape[-1] // latents.shape[3] * pw


def flow_matching_loss(dit: DiT, batch: TrainBatch, key: jax.Array, *, flow_cfg: Any,
                       dropout: ConditionDropout, num_prefix: int = 0, aux_fn=None):
    """Returns ``(loss, terms)``; ``terms`` holds the loss parts and the kept-condition rates.

    ``aux_fn(x0_video, sigma [B], frame_mask [B, F], clean_latents, ref_latents) -> (loss,
    terms)`` adds losses on the clean-video estimate ``x_t - sigma v`` (stage 3's lip-sync and
    identity losses, ``training/aux_losses.py``)."""
    b, f = batch.latents.shape[:2]
    k_sigma, k_noise, k_motion, k_drop = jax.random.split(key, 4)
    sigma = sample_training_sigma(k_sigma, (b,), logit_mean=flow_cfg.logit_mean,
                                  logit_std=flow_cfg.logit_std,
                                  shift=training_shift(flow_cfg, dit, batch.latents))
    sigma_bf, frame_mask = prefix_frame_sigma(sigma, f, num_prefix)

    x0 = {"video": batch.latents}
    noise = {"video": jax.random.normal(k_noise, batch.latents.shape, batch.latents.dtype)}
    if batch.motion is not None:
        x0["motion"] = batch.motion
        noise["motion"] = jax.random.normal(k_motion, batch.motion.shape, batch.motion.dtype)
    x_t = noise_latents(x0, noise, sigma_bf)
    target = velocity_target(x0, noise)

    keep = sample_condition_masks(k_drop, b, dropout)
    text = batch.text * keep["keep_text"][:, None, None].astype(batch.text.dtype)
    gen = GenInputs(latents=x_t["video"], timesteps=sigma_to_timestep(sigma_bf), text=text,
                    motion=x_t.get("motion"), audio=batch.audio,
                    audio_mask=keep["keep_audio"].astype(jnp.float32),
                    cond_latents=batch.cond_latents)
    ref = None
    if batch.ref_latents is not None:
        ref = RefInputs(latents=batch.ref_latents, motion=batch.ref_motion, audio=batch.ref_audio,
                        valid_frames=jnp.where(keep["keep_ref"], batch.ref_latents.shape[1], 0))
    pred = dit(gen, ref)

    weights = None
    masks = [m for m in (batch.face_mask, batch.mouth_mask, batch.eye_mask) if m is not None]
    if masks:
        weights = region_token_weights(
            batch.face_mask, batch.mouth_mask, batch.eye_mask, face_weight=flow_cfg.face_weight,
            mouth_weight=flow_cfg.mouth_weight, eye_weight=flow_cfg.eye_weight,
            spatial_stride=token_pixels(dit, batch.latents, masks[0]))
    loss, terms = total_loss(pred, target, token_weights=weights, frame_mask=frame_mask,
                             motion_weight=flow_cfg.motion_weight)
    terms = dict(terms, **{k: v.astype(jnp.float32).mean() for k, v in keep.items()})
    if aux_fn is not None:
        s = sigma_bf.reshape(sigma_bf.shape + (1,) * (x_t["video"].ndim - 2))
        x0_video = x_t["video"] - s * pred["video"].astype(jnp.float32)
        aux, aux_terms = aux_fn(x0_video, sigma, frame_mask, batch.latents, batch.ref_latents)
        loss = loss + aux
        terms = dict(terms, **aux_terms, total=loss)
    return loss, terms
