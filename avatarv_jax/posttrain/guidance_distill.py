"""Guidance distillation: one student pass that reproduces the teacher's guided velocity.

Multi-condition classifier-free guidance costs three teacher passes per step
(``diffusion.guidance.guided_velocity``: ``v_u + w_t (v_text - v_u) + w_a (v_full - v_text)``).
The student is conditioned on the scales (embedded like the timestep) and regresses, at random
``(x_sigma, sigma)`` and scales drawn uniformly per sample from the usable ranges, onto that
guided velocity: ``min E || v_student(x, sigma, w_t, w_a) - stop_grad(v_guided) ||^2``. At
the optimum the student equals the guided teacher for every scale in the ranges, so inference
needs one pass instead of three and the scales stay adjustable.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def _check_range(name: str, value) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    if not lo <= hi:
        raise ValueError(f"{name} must be (low, high) with low <= high, got {tuple(value)}")
    return lo, hi


def sample_guidance_scales(key: jax.Array, batch: int, *, text_range=(1.0, 6.0),
                           audio_range=(1.0, 6.0)) -> tuple[jax.Array, jax.Array]:
    """Per-sample text and audio guidance scales [B], uniform over their ranges."""
    if int(batch) != batch or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch}")
    t_lo, t_hi = _check_range("text_range", text_range)
    a_lo, a_hi = _check_range("audio_range", audio_range)
    k_t, k_a = jax.random.split(key)
    text = jax.random.uniform(k_t, (batch,), jnp.float32, t_lo, t_hi)
    audio = jax.random.uniform(k_a, (batch,), jnp.float32, a_lo, a_hi)
    return text, audio


def guidance_distill_loss(student_v: PyTree, teacher_v: PyTree) -> tuple[jax.Array, dict]:
    """Mean squared error over every element of every leaf, in fp32; the teacher is held
    constant (stop-gradient). Returns ``(loss, {'loss'})``."""
    s_leaves, treedef = jax.tree.flatten(student_v)
    t_leaves = treedef.flatten_up_to(teacher_v)
    total, count = jnp.zeros((), jnp.float32), 0
    for s, t in zip(s_leaves, t_leaves):
        if s.shape != t.shape:
            raise ValueError(f"student velocity shape {s.shape} differs from the teacher's "
                             f"{t.shape}")
        t = jax.lax.stop_gradient(t)
        total = total + jnp.sum(jnp.square(s.astype(jnp.float32) - t.astype(jnp.float32)))
        count += s.size
    loss = total / max(count, 1)
    return loss, {"loss": loss}
