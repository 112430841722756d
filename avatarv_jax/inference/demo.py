"""A walk-through of one chunk's data flow on the tiny model, printing each stage's shape and time.

The full pipeline (chunks, streaming decode, mp4) is ``inference/pipeline.py`` behind
``infer.py``; this stays as a short, readable tour of the pieces.

Builds every model of a config (text encoder, audio encoder, VAE, DiT) with fresh weights,
renders an AvatarWorld reference clip (frames, motion vectors, the person's own speech) and a
second clip of the same person whose speech drives the output, encodes the reference once
(``RefCache``), runs one guided sampling pass over a chunk and decodes it, printing the shape
and time of each stage. With random weights the output is noise; the point is the data flow.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from avatarv_jax.data.avatarworld.clip import make_clip
from avatarv_jax.diffusion.flow import resolution_shift
from avatarv_jax.diffusion.samplers import sigma_schedule
from avatarv_jax.inference.guided import encode_guidance_caches, sample_chunk
from avatarv_jax.models import factory
from avatarv_jax.models.dit import RefInputs
from avatarv_jax.models.motion import pack_motion
from avatarv_jax.models.text_encoder import encode_text
from avatarv_jax.models.tokenizer import make_tokenizer

SAMPLE_RATE = 16000


def run_demo(cfg, *, seed: int = 0, steps: int | None = None, size: int = 64,
             ref_frames: int = 5, gen_frames: int = 9, prompt: str | None = None,
             log=print) -> dict:
    """Runs the demo and returns the timings and output shapes."""
    t0 = time.perf_counter()
    models = factory.build_models(cfg, seed=seed)
    dit, vae = models["dit"], models["vae"]
    timings = {"build_models_s": time.perf_counter() - t0}

    def timed(name, fn, *args):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        timings[name] = time.perf_counter() - start
        return out

    reference = timed("render_reference_s", lambda: make_clip(
        seed, identity_id=seed % 7, scene_id=1, resolution=size, num_frames=ref_frames))
    driving = make_clip(seed + 1, identity_id=seed % 7, scene_id=2, resolution=size,
                        num_frames=gen_frames)
    prompt = prompt or driving.caption
    ref_video = jnp.asarray(reference.frames[None], jnp.float32) / 127.5 - 1.0
    audio, ref_audio = driving.audio, reference.audio
    log(f"reference video {tuple(ref_video.shape)} ({reference.speech_backend} speech), "
        f"driving audio {audio.shape[0] / SAMPLE_RATE:.2f} s, prompt {prompt!r}")

    tokenizer = make_tokenizer(None)
    text, _ = timed("text_encoder_s", lambda: encode_text(models["text_encoder"], tokenizer,
                                                         [prompt], max_length=256))
    audio_enc = jax.jit(models["audio_encoder"].__call__)
    gen_audio = timed("audio_encoder_s", audio_enc, jnp.asarray(audio)[None])
    ref_audio_feats = audio_enc(jnp.asarray(ref_audio)[None])
    ref_latents = timed("vae_encode_s", jax.jit(vae.encode), ref_video)
    log(f"text {tuple(text.shape)}  audio features {tuple(gen_audio.shape)}  "
        f"reference latents {tuple(ref_latents.shape)}")

    motion_dim = dit.cfg.motion_dim
    if motion_dim and motion_dim != reference.motion.shape[-1]:
        raise ValueError(f"config motion_dim {motion_dim} != AvatarWorld's "
                         f"{reference.motion.shape[-1]}")
    ref_motion = pack_motion(jnp.asarray(reference.motion)[None]) if motion_dim else None
    ref = RefInputs(latents=ref_latents, motion=ref_motion, audio=ref_audio_feats)
    ref_cache = timed("encode_reference_s", jax.jit(dit.encode_reference), ref)
    log(f"RefCache keys {tuple(ref_cache.keys.shape)} (layers, batch, tokens, heads, head dim)")

    latent_frames = 1 + (gen_frames - 1) // 4
    caches = encode_guidance_caches(dit, text, gen_audio, ref_cache, num_frames=latent_frames)
    key = jax.random.key(seed)
    noise = {"video": jax.random.normal(key, (1, latent_frames) + ref_latents.shape[2:])}
    if motion_dim:
        noise["motion"] = jax.random.normal(jax.random.fold_in(key, 1),
                                            (1, latent_frames, 4 * motion_dim))
    num_steps = steps or cfg.sampling.num_steps
    _, ph, pw = dit.cfg.patch_size
    shift = cfg.sampling.shift or resolution_shift(
        (ref_latents.shape[2] // ph) * (ref_latents.shape[3] // pw))
    sampler = jax.jit(lambda c, n: sample_chunk(
        dit, c, n, sigma_schedule(num_steps, shift=shift),
        text_scale=cfg.sampling.text_scale, audio_scale=cfg.sampling.audio_scale,
        method=cfg.sampling.method))
    compiled = timed("sampling_compile_s", lambda: sampler.lower(caches, noise).compile())
    latents = timed("sampling_s", compiled, caches, noise)
    log(f"guided sampling: {num_steps} steps x 3 passes (shift {shift:.2f}), "
        f"latents {tuple(latents['video'].shape)}")
    video = timed("vae_decode_s", jax.jit(vae.decode), latents["video"])
    log(f"decoded video {tuple(video.shape)}, range [{float(video.min()):.2f}, "
        f"{float(video.max()):.2f}]")
    timings["total_s"] = time.perf_counter() - t0
    for name, value in timings.items():
        log(f"  {name:<22}{value:8.2f}")
    return {"timings": timings, "video_shape": tuple(video.shape),
            "latent_shape": tuple(latents["video"].shape)}
