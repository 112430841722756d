"""Pipeline batches -> the DiT's TrainBatch, through the frozen encoders.

A pipeline batch (``data/pipelines.py``) holds pixels, waveforms and token ids; the DiT trains
on latents and features. The frozen text encoder, audio encoder and VAE run inside the jitted
train step (no gradient flows into them); latent-mode batches (``latents``/``ref_latents``)
skip the VAE; ``text_embeddings`` [B, L, text_dim] and audio given as features
[B, T, audio_dim] (instead of waveforms) skip the text and audio encoders.

``audio`` may carry ``data.audio_context_frames`` frames of context either side of the clip
((T + 2m) x 640 samples): the audio encoder runs on the whole window, as inference runs it on a
chunk with its context, and only the T frames' features are kept (``clip_features``).

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
SAMPLES_PER_FRAME = 640   # 16 kHz audio at 25 fps

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
        if "audio" in batch and batch["audio"].ndim == 2:
            audio_context(batch["audio"].shape[1], t)


def audio_context(num_samples: int, frames: int) -> int:
    """Frames of context either side of ``frames`` video frames in ``num_samples`` of audio
    ((frames + 2m) x 640 samples); a clear error for any other length."""
    extra = num_samples - frames * SAMPLES_PER_FRAME
    if extra < 0 or extra % (2 * SAMPLES_PER_FRAME):
        raise ValueError(f"audio has {num_samples} samples; {frames} frames at 25 fps need "
                         f"{frames * SAMPLES_PER_FRAME} plus the same whole number of frames of "
                         f"context (640 samples each) on either side")
    return extra // (2 * SAMPLES_PER_FRAME)


def clip_wave(wave, frames: int):
    """``[B, (frames + 2m) * 640]`` -> the clip's own ``[B, frames * 640]`` samples."""
    m = audio_context(wave.shape[1], frames) * SAMPLES_PER_FRAME
    return wave[:, m:m + frames * SAMPLES_PER_FRAME]


def _pixels(video: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float [-1, 1], the VAE's input range."""
    return video.astype(jnp.float32) / 127.5 - 1.0


def _latents(vae, batch: Mapping, video_key: str, latent_key: str):
    if latent_key in batch:
        return batch[latent_key].astype(jnp.float32)
    return jax.lax.stop_gradient(vae.encode(_pixels(batch[video_key])))


def clip_features(audio_encoder, wave, frames: int):
    """The audio features of the clip's ``frames`` video frames, the encoder run over the whole
    window (context included); precomputed features [B, T, audio_dim] pass through."""
    if wave.ndim == 3:
        return wave.astype(jnp.float32)
    m = audio_context(wave.shape[1], frames)
    feats = jax.lax.stop_gradient(audio_encoder(wave.astype(jnp.float32)))
    return feats[:, m:m + frames]


def _video_frames(latents) -> int:
    return 1 + 4 * (latents.shape[1] - 1)    # the causal VAE: 1 + 4 (F - 1) video frames


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
        out["audio"] = clip_features(frozen.get("audio_encoder"), batch["audio"],
                                     _video_frames(latents))
        out["ref_latents"] = _latents(frozen.get("vae"), batch, "ref_video", "ref_latents")
    if stage == "sft":
        out["motion"] = pack_motion(batch["motion"].astype(jnp.float32))
        out["ref_motion"] = pack_motion(batch["ref_motion"].astype(jnp.float32))
        out["ref_audio"] = clip_features(frozen.get("audio_encoder"), batch["ref_audio"],
                                         _video_frames(out["ref_latents"]))
        for name in ("face", "mouth", "eye"):
            key = f"mask_{name}s" if name == "eye" else f"mask_{name}"
            if key in batch:
                out[f"{name}_mask"] = batch[key]
    return TrainBatch(**out)
