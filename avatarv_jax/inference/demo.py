"""The bundled demo until the full inference pipeline lands: the tiny model end to end.

Builds every model of a config (text encoder, audio encoder, VAE, DiT) with fresh weights,
makes a procedural reference clip and a speech-like audio signal, encodes the reference once
(``RefCache``), runs one guided sampling pass over a chunk and decodes it, printing the shape
and time of each stage. With random weights the output is noise; the point is the data flow.
"""

from __future__ import annotations

import time

import numpy as np
import jax
import jax.numpy as jnp

from avatarv_jax.diffusion.samplers import sigma_schedule
from avatarv_jax.inference.guided import encode_guidance_caches, sample_chunk
from avatarv_jax.models import factory
from avatarv_jax.models.dit import RefInputs
from avatarv_jax.models.motion import pack_motion
from avatarv_jax.models.text_encoder import encode_text
from avatarv_jax.models.tokenizer import make_tokenizer

SAMPLE_RATE, FPS = 16000, 25


def procedural_clip(frames: int, size: int, seed: int) -> np.ndarray:
    """[frames, size, size, 3] in [-1, 1]: a moving face-like blob on a gradient background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for t in range(frames):
        cx, cy = 0.5 + 0.05 * np.sin(t / 5), 0.45 + 0.03 * np.cos(t / 7)
        face = np.exp(-(((xx - cx) / 0.2) ** 2 + ((yy - cy) / 0.25) ** 2))
        mouth = np.exp(-(((xx - cx) / 0.08) ** 2 + ((yy - cy - 0.12) / (0.01 + 0.02 * abs(np.sin(t / 2)))) ** 2))
        img = np.stack([0.3 + 0.6 * face - 0.5 * mouth, 0.2 + 0.5 * face, 0.6 * yy + 0.3 * face], -1)
        out.append(img + 0.02 * rng.normal(size=img.shape))
    return np.clip(np.asarray(out) * 2 - 1, -1, 1).astype(np.float32)


def speech_like_audio(seconds: float, seed: int) -> np.ndarray:
    """Syllable-rate amplitude-modulated harmonics with pauses, 16 kHz mono."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = 140 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) * (np.sin(2 * np.pi * 0.5 * t) > -0.5)
    return (0.3 * voice * envelope + 0.003 * rng.normal(size=t.shape)).astype(np.float32)


def run_demo(cfg, *, seed: int = 0, steps: int | None = None, size: int = 64,
             ref_frames: int = 5, gen_frames: int = 9, prompt: str = "a person talking in a "
             "bright studio", log=print) -> dict:
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

    ref_video = jnp.asarray(procedural_clip(ref_frames, size, seed))[None]
    audio = speech_like_audio(gen_frames / FPS, seed + 1)
    ref_audio = speech_like_audio(ref_frames / FPS, seed + 2)
    log(f"reference video {tuple(ref_video.shape)}, audio {audio.shape[0] / SAMPLE_RATE:.2f} s, "
        f"prompt {prompt!r}")

    tokenizer = make_tokenizer(None)
    text, _ = timed("text_encoder_s", lambda: encode_text(models["text_encoder"], tokenizer,
                                                         [prompt], max_length=32))
    audio_enc = jax.jit(models["audio_encoder"].__call__)
    gen_audio = timed("audio_encoder_s", audio_enc, jnp.asarray(audio)[None])
    ref_audio_feats = audio_enc(jnp.asarray(ref_audio)[None])
    ref_latents = timed("vae_encode_s", jax.jit(vae.encode), ref_video)
    log(f"text {tuple(text.shape)}  audio features {tuple(gen_audio.shape)}  "
        f"reference latents {tuple(ref_latents.shape)}")

    motion_dim = dit.cfg.motion_dim
    ref_motion = pack_motion(jnp.zeros((1, ref_frames, motion_dim))) if motion_dim else None
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
    sampler = jax.jit(lambda c, n: sample_chunk(
        dit, c, n, sigma_schedule(num_steps, shift=cfg.sampling.shift or 3.0),
        text_scale=cfg.sampling.text_scale, audio_scale=cfg.sampling.audio_scale,
        method=cfg.sampling.method))
    compiled = timed("sampling_compile_s", lambda: sampler.lower(caches, noise).compile())
    latents = timed("sampling_s", compiled, caches, noise)
    log(f"guided sampling: {num_steps} steps x 3 passes, latents {tuple(latents['video'].shape)}")
    video = timed("vae_decode_s", jax.jit(vae.decode), latents["video"])
    log(f"decoded video {tuple(video.shape)}, range [{float(video.min()):.2f}, "
        f"{float(video.max()):.2f}]")
    timings["total_s"] = time.perf_counter() - t0
    for name, value in timings.items():
        log(f"  {name:<22}{value:8.2f}")
    return {"timings": timings, "video_shape": tuple(video.shape),
            "latent_shape": tuple(latents["video"].shape)}
