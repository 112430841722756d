"""Periodic sample videos: what the model makes of one training example's conditions.

The first example of the current batch gives the text, audio and reference (whatever the
stage uses); guided sampling (``inference/guided.py``) from noise with the EMA weights when
kept, then the VAE decodes and PyAV writes ``WORKDIR/samples/step_<N>.mp4`` (with the
example's audio when it has some). Kept small on purpose: one example, one chunk.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from avatarv_jax.data.avatarworld.media import write_mp4
from avatarv_jax.diffusion.flow import resolution_shift
from avatarv_jax.diffusion.samplers import sigma_schedule
from avatarv_jax.inference.guided import encode_guidance_caches, sample_chunk
from avatarv_jax.models.dit import RefInputs
from avatarv_jax.training.batch import clip_wave, encode_batch


def sample_video(cfg, builder, params, frozen_params, batch, *, seed: int = 0):
    """Decoded video [1, T, H, W, 3] in [-1, 1] for the first example of ``batch``."""
    stage, steps = builder.stage, int(cfg.train.sample_steps)

    @jax.jit
    def run(params, frozen_params, batch):
        dit = builder.dit.merge(params)
        frozen = {k: builder.frozen[k].merge(v) for k, v in frozen_params.items()}
        tb = encode_batch(frozen, batch, stage)
        ref_cache = None
        if tb.ref_latents is not None:
            ref_cache = dit.encode_reference(RefInputs(latents=tb.ref_latents,
                                                       motion=tb.ref_motion, audio=tb.ref_audio))
        f = tb.latents.shape[1]
        caches = encode_guidance_caches(dit, tb.text, tb.audio, ref_cache, num_frames=f)
        key = jax.random.key(seed)
        noise = {"video": jax.random.normal(key, tb.latents.shape)}
        if tb.motion is not None:
            noise["motion"] = jax.random.normal(jax.random.fold_in(key, 1), tb.motion.shape)
        _, ph, pw = dit.cfg.patch_size
        shift = cfg.sampling.shift or resolution_shift(
            (tb.latents.shape[2] // ph) * (tb.latents.shape[3] // pw))
        latents = sample_chunk(dit, caches, noise, sigma_schedule(steps, shift=shift),
                               text_scale=cfg.sampling.text_scale,
                               audio_scale=cfg.sampling.audio_scale if tb.audio is not None
                               else 0.0, method=cfg.sampling.method)
        return frozen["vae"].decode(latents["video"])

    first = {k: np.asarray(v)[:1] for k, v in batch.items()}
    return run(params, frozen_params, first)


def write_sample(cfg, builder, state, frozen_params, batch, out_dir: Path, *, step: int) -> Path:
    params = state.ema if state.ema is not None else state.params
    video = np.asarray(jax.device_get(sample_video(cfg, builder, params, frozen_params, batch)))
    frames = np.clip((video[0] + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
    audio = None
    if "audio" in batch and np.ndim(batch["audio"]) == 2:     # the clip's own samples
        audio = np.asarray(clip_wave(np.asarray(batch["audio"])[:1], frames.shape[0]))[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"step_{step:08d}.mp4"
    write_mp4(str(path), frames, audio)
    return path
