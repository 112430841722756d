"""Sampling one GEN chunk with multi-condition classifier-free guidance and both cache levels.

Three predictions per step (DESIGN §3.4): ``uncond`` (no text, no reference, no audio),
``text`` (text + reference, no audio) and ``full``. The reference is encoded once
(``RefCache``); the unconditional pass reuses that cache with ``valid_frames = 0``, so GEN sees
no REF key. Text and audio cross-attention keys/values are encoded once per chunk
(``CondCache``) for each of the three condition sets and reused by every step.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import struct

from avatarv_jax.diffusion.flow import sigma_to_timestep
from avatarv_jax.diffusion.guidance import guided_velocity, num_guidance_passes
from avatarv_jax.diffusion.samplers import sample
from avatarv_jax.models.dit import CondCache, DiT, GenInputs, RefCache, RefInputs


@struct.dataclass
class GuidanceCaches:
    full: CondCache
    text: CondCache
    uncond: CondCache
    ref: RefCache | None
    uncond_ref: RefCache | None


def encode_guidance_caches(dit: DiT, text, audio=None, ref_cache: RefCache | None = None,
                           *, num_frames: int) -> GuidanceCaches:
    """The condition caches of the three guidance passes, for one chunk."""
    b = text.shape[0]
    # Without audio keys/values the blocks skip audio cross-attention: the same result as a
    # zero audio mask, without the work.
    full = dit.encode_conditions(text, audio, num_frames=num_frames)
    text_only = dit.encode_conditions(text, None, num_frames=num_frames)
    uncond = dit.encode_conditions(jnp.zeros_like(text), None, num_frames=num_frames)
    uncond_ref = None
    if ref_cache is not None:
        uncond_ref = ref_cache.replace(valid_frames=jnp.zeros((b,), jnp.int32))
    return GuidanceCaches(full, text_only, uncond, ref_cache, uncond_ref)


@struct.dataclass
class JointInputs:
    """The uncached equivalent of ``GuidanceCaches``: raw conditions, re-encoded every step."""

    text: jax.Array
    audio: jax.Array | None
    ref: RefInputs | None


Predictor = Callable[[GenInputs, str], dict]


def cached_predictor(dit: DiT, caches: GuidanceCaches) -> Predictor:
    """One guidance pass (``'full'``, ``'text'``, ``'uncond'``) from the two cache levels."""
    def predict(gen: GenInputs, which: str) -> dict:
        ref = caches.uncond_ref if which == "uncond" else caches.ref
        return dit(gen, ref_cache=ref, cond_cache=getattr(caches, which))
    return predict


def joint_predictor(dit: DiT, inputs: JointInputs) -> Predictor:
    """The same passes through the joint forward (REF and conditions encoded every call)."""
    def predict(gen: GenInputs, which: str) -> dict:
        ref = inputs.ref
        if which == "uncond":
            gen = gen.replace(text=jnp.zeros_like(inputs.text))
            if ref is not None:
                ref = ref.replace(valid_frames=jnp.zeros((inputs.text.shape[0],), jnp.int32))
        else:
            gen = gen.replace(text=inputs.text,
                              audio=inputs.audio if which == "full" else None)
        return dit(gen, ref)
    return predict


def chunk_velocity(predict: Predictor, *, text_scale: float, audio_scale: float,
                   prefix: dict | None = None, cond_latents=None,
                   guidance_embedded: bool = False):
    """The guided velocity ``v(x, sigma)`` of a chunk's noisy frames behind a clean prefix.

    ``prefix`` ({'video': [B,P,...], 'motion'?}) holds clean frames carried over from the
    previous chunk: they stay fixed, at timestep 0, in front of the noisy frames, and only the
    noisy frames' velocity is returned. A guidance-distilled DiT (``guidance_embedded``) gives
    the guided velocity in one ``full`` pass that is told the two scales.
    """
    num_prefix = 0 if prefix is None else prefix["video"].shape[1]
    passes = 1 if guidance_embedded else num_guidance_passes(text_scale, audio_scale)

    def with_prefix(x):
        if prefix is None:
            return x
        return {k: jnp.concatenate([prefix[k], v], axis=1) for k, v in x.items()}

    def velocity(x, sigma):
        full_x = with_prefix(x)
        b, f = full_x["video"].shape[:2]
        frame_sigma = jnp.where(jnp.arange(f) < num_prefix, 0.0, sigma)
        timesteps = jnp.broadcast_to(sigma_to_timestep(frame_sigma), (b, f))
        guidance = None
        if guidance_embedded:
            guidance = jnp.broadcast_to(jnp.asarray([text_scale, audio_scale], jnp.float32),
                                        (b, 2))
        gen = GenInputs(latents=full_x["video"], timesteps=timesteps,
                        motion=full_x.get("motion"), cond_latents=cond_latents,
                        guidance=guidance)

        def run(which):
            out = predict(gen, which)
            return {k: v[:, num_prefix:] for k, v in out.items() if k in x}

        v_full = run("full")
        if passes == 1:
            return v_full
        return guided_velocity(run("uncond"), run("text"), v_full, text_scale=text_scale,
                               audio_scale=audio_scale)

    return velocity


def sample_chunk(dit: DiT, caches: GuidanceCaches, noise: dict, sigmas: jax.Array, *,
                 text_scale: float, audio_scale: float, prefix: dict | None = None,
                 cond_latents=None, method: str = "euler") -> dict:
    """Denoise ``noise`` ({'video': [B,F,H,W,C], 'motion'?}) along ``sigmas`` to clean latents,
    in one ``lax`` loop (``chunk_velocity`` has the prefix rule)."""
    velocity = chunk_velocity(cached_predictor(dit, caches), text_scale=text_scale,
                              audio_scale=audio_scale, prefix=prefix, cond_latents=cond_latents,
                              guidance_embedded=dit.cfg.guidance_embed)
    return sample(velocity, noise, sigmas, method=method)
