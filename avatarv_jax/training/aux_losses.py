"""Stage 3's auxiliary losses (DESIGN §5): lip sync and identity read from the DiT's estimate
of the clean video.

Why: the flow loss spreads its gradient over every latent value, and how far the lips open is a
small part of it. A small DiT learns the audio-driven motion tokens long before it draws the
lips (``benchmarks/audio_reliance.py``: another clip's audio costs the SFT model +35 % of its
motion loss and +0.05 % of its video loss). These losses decode the estimate
``x0 = x_t - sigma * v`` (the prefix frames, at sigma 0, are the clean latents) with the frozen
VAE and read the frames with the AvatarWorld probe:

* ``lip_sync``: mean squared difference, over the video frames of the noisy latent frames,
  between the mouth opening the probe reads in the decoded estimate and in the decoded clean
  latents. The target is the VAE's rendering of the truth, not the real frames: through the
  tiny VAE the probe reads the real clip's mouth with an error (mean square 0.11 on AvatarWorld
  at 64 px) larger than its variation within a clip (0.04), so a real-frame target would mostly
  teach the DiT to undo the VAE's bias instead of following the speech;
* ``identity``: 1 - cosine of the probe's identity embeddings (attribute probabilities averaged
  over frames) of the estimate and of the reference clip.

Only samples drawn at ``sigma <= max_sigma`` count: at high noise the estimate is a blur whose
mouth nobody can read. The probe knows AvatarWorld faces only, so these losses need AvatarWorld
batches (10-d motion); on real video keep their weights at 0.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from avatarv_jax.data.avatarworld import motion as mo
from avatarv_jax.models.motion import TEMPORAL_STRIDE
from avatarv_jax.posttrain.rewards import ProbeRewards, identity_embedding
from avatarv_jax.training.batch import _pixels

AUX_LOSSES = ("lip_sync", "identity")
_MOUTH = mo.MOTION_FIELDS.index("mouth_open")


def video_frame_mask(frame_mask: jax.Array) -> jax.Array:
    """Per latent frame [B, F] -> per video frame [B, 1 + 4(F-1)] (the causal VAE's grouping:
    latent frame 0 is video frame 0, latent frame l >= 1 is video frames 4l-3 .. 4l)."""
    return jnp.concatenate([frame_mask[:, :1],
                            jnp.repeat(frame_mask[:, 1:], TEMPORAL_STRIDE, axis=1)], axis=1)


def check_aux_config(aux_cfg) -> dict[str, float]:
    """The non-zero weights of ``cfg.aux``, with clear errors for bad values."""
    if aux_cfg is None:
        return {}
    weights = {name: float(aux_cfg.get(f"{name}_weight", 0.0)) for name in AUX_LOSSES}
    bad = {k: v for k, v in weights.items() if v < 0}
    if bad:
        raise ValueError(f"aux loss weights must be >= 0, got {bad}")
    if not 0.0 < float(aux_cfg.get("max_sigma", 0.5)) <= 1.0:
        raise ValueError(f"aux.max_sigma must be in (0, 1], got {aux_cfg.max_sigma}")
    return {k: v for k, v in weights.items() if v > 0}


class ProbeAuxLosses:
    """``aux_fn`` for ``flow_matching_loss``: the weighted lip-sync and identity losses of the
    decoded clean-video estimate. ``decode`` maps latents [B, F, h, w, C] to frames
    [B, 1 + 4(F-1), H, W, 3] in [-1, 1] (the frozen VAE; gradients flow through it to the
    estimate, not into its weights, which the step does not differentiate)."""

    def __init__(self, weights: Mapping[str, float], max_sigma: float,
                 decode: Callable[[jax.Array], jax.Array], batch: Mapping[str, jax.Array],
                 probe=None):
        unknown = sorted(set(weights) - set(AUX_LOSSES))
        if unknown:
            raise ValueError(f"unknown aux losses {unknown}; known: {list(AUX_LOSSES)}")
        if "motion" in batch and batch["motion"].shape[-1] != mo.MOTION_DIM:
            raise ValueError(f"the aux losses read frames with the AvatarWorld probe and need "
                             f"AvatarWorld batches ({mo.MOTION_DIM}-d motion); this batch's "
                             f"motion has {batch['motion'].shape[-1]}: set aux.*_weight to 0")
        self.weights, self.max_sigma = dict(weights), float(max_sigma)
        self.decode, self.batch = decode, batch
        self.probe = probe or ProbeRewards()

    def _reference_frames(self, ref_latents: jax.Array | None) -> jax.Array:
        if "ref_video" in self.batch:
            return _pixels(self.batch["ref_video"])
        if ref_latents is None:
            raise ValueError("the identity aux loss needs a reference (ref_video or ref_latents)")
        return self.decode(ref_latents)

    def __call__(self, x0_video: jax.Array, sigma: jax.Array, frame_mask: jax.Array,
                 clean_latents: jax.Array, ref_latents: jax.Array | None):
        """x0_video [B, F, h, w, C] the estimate; sigma [B]; frame_mask [B, F] 1 on noisy
        frames. Returns (weighted sum, terms) with each loss averaged over counted samples."""
        frames = self.decode(x0_video)
        unit, probs = self.probe.read_unit(frames)
        use = (sigma <= self.max_sigma).astype(jnp.float32)
        count = jnp.maximum(use.sum(), 1.0)
        terms, total = {}, jnp.zeros((), jnp.float32)
        if "lip_sync" in self.weights:
            truth, _ = self.probe.read(jax.lax.stop_gradient(self.decode(clean_latents)))
            mask = video_frame_mask(frame_mask)[:, :unit.shape[1]]
            # mouth_open spans [0, 1], so the unit output is the opening; unclipped on the
            # estimate so a closed mouth read below 0 still has a gradient.
            err = (unit[..., _MOUTH] - jax.lax.stop_gradient(truth[..., _MOUTH])) ** 2
            per_sample = (err * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)
            terms["aux_lip_sync"] = (per_sample * use).sum() / count
        if "identity" in self.weights:
            ref = jax.lax.stop_gradient(self._reference_frames(ref_latents))
            _, ref_probs = self.probe.read(ref)
            e = identity_embedding(probs)
            e_ref = jax.lax.stop_gradient(identity_embedding(ref_probs))
            per_sample = 1.0 - (e * e_ref).sum(-1)
            terms["aux_identity"] = (per_sample * use).sum() / count
        for name, weight in self.weights.items():
            total = total + weight * terms[f"aux_{name}"]
        terms["aux_fraction"] = use.mean()
        return total, terms
