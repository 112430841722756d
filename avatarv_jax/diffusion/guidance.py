"""Classifier-free guidance with separate audio and text/reference scales, and the condition
dropout in training that makes the unconditional and audio-free predictions available.

Three predictions, each a pytree of velocities:

* ``v_uncond``: no text, no reference, no audio;
* ``v_text``:   text and reference, no audio;
* ``v_full``:   text, reference and audio.

Guidance walks from ``v_uncond`` to ``v_text`` by ``text_scale`` and from ``v_text`` to
``v_full`` by ``audio_scale``, so the two conditions are strengthened independently: a high
audio scale sharpens lip sync without over-saturating the look the text scale controls.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def guidance_coefficients(text_scale, audio_scale) -> tuple[Any, Any, Any]:
    """Weights of ``(v_uncond, v_text, v_full)`` in the guided velocity; they sum to 1."""
    return 1.0 - text_scale, text_scale - audio_scale, audio_scale


def per_sample(value, leaf: jax.Array) -> jax.Array:
    """A scalar, or a per-sample [B] value broadcast over a [B, ...] leaf, in fp32 (guidance-
    conditioned distillation draws a scale per sample; stages 4-5 use it for noise levels)."""
    value = jnp.asarray(value, jnp.float32)
    if value.ndim == 0:
        return value
    if value.ndim != 1 or leaf.ndim < 1 or value.shape[0] != leaf.shape[0]:
        raise ValueError(f"a per-sample value must be a scalar or [B]; got shape "
                         f"{value.shape} for an array of shape {leaf.shape}")
    return value.reshape(value.shape + (1,) * (leaf.ndim - 1))


def guided_velocity(v_uncond: PyTree, v_text: PyTree, v_full: PyTree, *, text_scale,
                    audio_scale) -> PyTree:
    """``v_uncond + text_scale (v_text - v_uncond) + audio_scale (v_full - v_text)``.

    ``text_scale = audio_scale = 1`` gives exactly ``v_full`` (plain conditional sampling);
    ``audio_scale = 0`` ignores the audio (the text/reference-guided ``v_text`` path);
    ``text_scale = 0`` with ``audio_scale = 0`` gives ``v_uncond``. Scales are scalars or [B].
    Computed in fp32 and cast back to each leaf's dtype.
    """
    def combine(u, t, f):
        ts, aus = per_sample(text_scale, u), per_sample(audio_scale, u)
        u32, t32, f32 = (a.astype(jnp.float32) for a in (u, t, f))
        return (u32 + ts * (t32 - u32) + aus * (f32 - t32)).astype(u.dtype)

    return jax.tree.map(combine, v_uncond, v_text, v_full)


def num_guidance_passes(text_scale: float, audio_scale: float) -> int:
    """Model passes per sampling step (Python-number scales): 1 when both scales are 1, since
    the guided velocity is then ``v_full`` alone; otherwise 3 (uncond, text, full), batched
    together by the caller.

    Some other settings need only two predictions (a zero coefficient in
    ``guidance_coefficients``, e.g. ``audio_scale = 0``); callers that want to save that pass
    can test the coefficients, but this count is the plain, always-correct one.
    """
    return 1 if (float(text_scale) == 1.0 and float(audio_scale) == 1.0) else 3


@dataclasses.dataclass(frozen=True)
class ConditionDropout:
    """Condition dropout probabilities for training.

    With probability ``p_all`` every condition is dropped together (this is what trains
    ``v_uncond``); otherwise text, audio and reference are dropped independently with
    ``p_text``, ``p_audio`` and ``p_ref`` (audio dropped alone trains ``v_text``).
    """

    p_text: float = 0.1
    p_audio: float = 0.1
    p_ref: float = 0.05
    p_all: float = 0.05

    def __post_init__(self):
        for field in dataclasses.fields(self):
            p = getattr(self, field.name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"ConditionDropout.{field.name} must be in [0, 1], got {p}")


def sample_condition_masks(key: jax.Array, batch: int,
                           dropout: ConditionDropout) -> dict[str, jax.Array]:
    """Which conditions each sample keeps: ``{'keep_text', 'keep_audio', 'keep_ref'}``, [B] bool.

    So ``P(keep_text) = (1 - p_all)(1 - p_text)`` and likewise for audio and reference.
    """
    if int(batch) != batch or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch}")
    k_all, k_text, k_audio, k_ref = jax.random.split(key, 4)
    keep_any = ~jax.random.bernoulli(k_all, dropout.p_all, (batch,))
    return {
        "keep_text": keep_any & ~jax.random.bernoulli(k_text, dropout.p_text, (batch,)),
        "keep_audio": keep_any & ~jax.random.bernoulli(k_audio, dropout.p_audio, (batch,)),
        "keep_ref": keep_any & ~jax.random.bernoulli(k_ref, dropout.p_ref, (batch,)),
    }
