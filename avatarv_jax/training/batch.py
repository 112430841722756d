"""Pipeline batches -> the DiT's TrainBatch, through the frozen encoders.

A pipeline batch (``data/pipelines.py``) holds pixels, waveforms and token ids; the DiT trains
on latents and features. The frozen text encoder, audio encoder and VAE run inside the jitted
train step (no gradient flows into them); latent-mode batches (``latents``/``ref_latents``)
skip the VAE; ``text_embeddings`` [B, L, text_dim] and audio given as features
[B, T, audio_dim] (instead of waveforms) skip the text and audio encoders.

Which conditions a stage uses:
  t2v: video + text.   a2v: + audio, one reference frame.
  sft: + motion, face/mouth/eye masks, a multi-frame reference with its own audio and motion.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from avatarv_jax.diffusion.objective import TrainBatch
from avatarv_jax.models.motion import pack_motion

STAGES = ("t2v", "a2v", "sft")

# Keys every stage's batch must carry (video or latents is checked separately).
REQUIRED_KEYS = {
    "t2v": ("text_ids", "text_mask"),
    "a2v": ("text_ids", "text_mask", "audio"),
    "sft": ("text_ids", "text_mask", "audio", "motion", "ref_audio", "ref_motion"),
}


def check_batch(batch: Mapping, stage: str) -> None:
    """Clear errors for a batch that does not follow the stage's contract."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    missing = [k for k in REQUIRED_KEYS[stage] if k not in batch]
    if "video" not in batch and "latents" not in batch:
        missing.append("video (or latents)")
    if stage in ("a2v", "sft") and "ref_video" not in batch and "ref_latents" not in batch:
        missing.append("ref_video (or ref_latents)")
    if missing:
        raise ValueError(f"{stage} batch is missing {missing}; it has {sorted(batch)}")
    if "video" in batch:
        t = batch["video"].shape[1]
        if (t - 1) % 4:
            raise ValueError(f"video has {t} frames; the causal VAE needs 1 + 4k")
        if "audio" in batch and batch["audio"].ndim == 2 and batch["audio"].shape[1] != t * 640:
            raise ValueError(f"audio has {batch['audio'].shape[1]} samples; {t} frames at "
                             f"25 fps need {t * 640}")


def _pixels(video: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float [-1, 1], the VAE's input range."""
    return video.astype(jnp.float32) / 127.5 - 1.0


def _latents(vae, batch: Mapping, video_key: str, latent_key: str):
    if latent_key in batch:
        return batch[latent_key].astype(jnp.float32)
    return jax.lax.stop_gradient(vae.encode(_pixels(batch[video_key])))


def _audio(audio_encoder, wave):
    if wave.ndim == 3:                  # precomputed features [B, T, audio_dim]
        return wave.astype(jnp.float32)
    return jax.lax.stop_gradient(audio_encoder(wave.astype(jnp.float32)))


def encode_batch(frozen: Mapping[str, nnx.Module], batch: Mapping, stage: str) -> TrainBatch:
    """Run the frozen encoders on one pipeline batch (traced inside the train step)."""
    if "text_embeddings" in batch:      # precomputed (benchmarks, feature caches)
        text = batch["text_embeddings"]
    else:
        text = frozen["text_encoder"](batch["text_ids"], batch["text_mask"])
    # Wan feeds zero-padded text: positions past the mask carry no embedding.
    text = jax.lax.stop_gradient(text * batch["text_mask"][..., None].astype(text.dtype))
    latents = _latents(frozen.get("vae"), batch, "video", "latents")
    out = dict(latents=latents, text=text.astype(jnp.float32))
    if stage in ("a2v", "sft"):
        out["audio"] = _audio(frozen.get("audio_encoder"), batch["audio"])
        out["ref_latents"] = _latents(frozen.get("vae"), batch, "ref_video", "ref_latents")
    if stage == "sft":
        out["motion"] = pack_motion(batch["motion"].astype(jnp.float32))
        out["ref_motion"] = pack_motion(batch["ref_motion"].astype(jnp.float32))
        out["ref_audio"] = _audio(frozen.get("audio_encoder"), batch["ref_audio"])
        for name in ("face", "mouth", "eye"):
            key = f"mask_{name}s" if name == "eye" else f"mask_{name}"
            if key in batch:
                out[f"{name}_mask"] = batch[key]
    return TrainBatch(**out)
