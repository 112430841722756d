"""Distribution-matching distillation (DMD / DMD2) in the flow parameterisation.

A few-step generator G is trained so that its output distribution p_G matches the teacher's
p_real. The gradient of KL(p_G,s || p_real,s) between the two distributions noised to level s,
with respect to a generated sample, is ``score_fake - score_real`` at the noised sample; in the
flow parameterisation the scores are affine in the clean predictions
``x0_hat = x_s - s v`` (``score = -(x_s - (1 - s) x0_hat) / s^2``), so the direction is
``g = x0_hat_fake - x0_hat_real`` up to a positive per-level factor. ``score_real`` is the frozen
teacher, ``score_fake`` a second network fitted online to G's samples with the ordinary
flow-matching loss (``fake_score_loss``), several fake updates per generator update so it keeps
up. DMD2 normalises g per sample by ``mean |x0_gen - x0_hat_real|`` (scale-free steps across
noise levels) and writes the update as the surrogate ``0.5 * ||x0_gen - sg(x0_gen - g)||^2``,
whose gradient with respect to x0_gen is g: gradient descent moves samples from where the fake
score puts them towards where the real one does.

The generator is a few-step sampler: each step predicts ``x0_hat = x - s v(x, s)`` and re-noises
it to the next level with fresh noise (DMD2's multi-step scheme). Backward simulation runs the
generator's own first k steps (no gradient) and trains the step from there, so every step sees
the inputs it will see at inference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from avatarv_jax.diffusion.samplers import sigma_schedule
from avatarv_jax.diffusion.guidance import per_sample

PyTree = Any
VelocityFn = Callable[[PyTree, jax.Array], PyTree]


def predicted_x0(x_t: PyTree, v: PyTree, sigma) -> PyTree:
    """The clean prediction ``x_t - sigma v`` (sigma scalar or [B]), fp32 math, x_t's dtype."""
    def one(a, b):
        s = per_sample(sigma, a)
        return (a.astype(jnp.float32) - s * b.astype(jnp.float32)).astype(a.dtype)

    return jax.tree.map(one, x_t, v)


def _per_sample_mean(tree: PyTree) -> jax.Array:
    """Mean over every non-batch element of every leaf -> [B]."""
    leaves = jax.tree.leaves(tree)
    total = sum(a.reshape(a.shape[0], -1).sum(axis=1) for a in leaves)
    count = sum(a[0].size for a in leaves)
    return total / count


def dmd_generator_loss(x0_gen: PyTree, x_t: PyTree, sigma, v_real: PyTree,
                       v_fake: PyTree) -> tuple[jax.Array, dict]:
    """DMD2's generator loss. ``x_t`` is ``x0_gen`` noised to ``sigma`` (scalar or [B]);
    ``v_real`` and ``v_fake`` are the teacher's and the fake score's velocities at ``x_t``, which
    the caller must pass already stop-gradded (only ``x0_gen`` carries the generator's gradient).

    d loss / d x0_gen = g / N with ``g = (x0_hat_fake - x0_hat_real) / mean|x0_gen - x0_hat_real|``
    (per sample) and N the element count. Terms: loss, grad_norm (rms of g), normalizer.
    """
    x_t = jax.lax.stop_gradient(x_t)
    v_real, v_fake = jax.lax.stop_gradient((v_real, v_fake))
    x0_real = predicted_x0(x_t, v_real, sigma)
    x0_fake = predicted_x0(x_t, v_fake, sigma)
    f32 = lambda t: jax.tree.map(lambda a: a.astype(jnp.float32), t)
    x0_gen32, x0_real, x0_fake = f32(x0_gen), f32(x0_real), f32(x0_fake)
    normalizer = jax.lax.stop_gradient(_per_sample_mean(
        jax.tree.map(lambda a, b: jnp.abs(a - b), x0_gen32, x0_real)))
    normalizer = jnp.maximum(normalizer, 1e-6)
    grad = jax.tree.map(lambda f, r: (f - r) / per_sample(normalizer, f), x0_fake, x0_real)
    target = jax.lax.stop_gradient(jax.tree.map(lambda a, g: a - g, x0_gen32, grad))
    leaves = jax.tree.leaves(jax.tree.map(lambda a, t: jnp.square(a - t), x0_gen32, target))
    count = sum(a.size for a in leaves)
    loss = 0.5 * sum(jnp.sum(a) for a in leaves) / count
    grad_rms = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grad)) / count)
    return loss, {"loss": loss, "grad_norm": grad_rms, "normalizer": normalizer.mean()}


def fake_score_loss(v_fake_pred: PyTree, x0_gen: PyTree, noise: PyTree) -> tuple[jax.Array, dict]:
    """Flow matching of the fake score on generated samples: MSE of ``v_fake_pred`` (at
    ``(1 - s) x0_gen + s noise``) against ``noise - x0_gen`` (no gradient to the generator)."""
    x0_gen = jax.lax.stop_gradient(x0_gen)
    errs = jax.tree.leaves(jax.tree.map(
        lambda p, a, n: jnp.square(p.astype(jnp.float32)
                                   - (n.astype(jnp.float32) - a.astype(jnp.float32))),
        v_fake_pred, x0_gen, noise))
    loss = sum(jnp.sum(e) for e in errs) / sum(e.size for e in errs)
    return loss, {"loss": loss}


def few_step_sigmas(num_steps: int = 4, shift: float = 1.0) -> jax.Array:
    """The generator's ``num_steps + 1`` noise levels from 1 to 0."""
    return sigma_schedule(num_steps, shift=shift)


def generator_step(velocity_fn: VelocityFn, x: PyTree, sigma, sigma_next, key) -> PyTree:
    """One generator step: ``x0_hat = x - sigma v(x, sigma)``, re-noised to ``sigma_next`` with
    fresh noise from ``key`` (``sigma_next = 0`` returns x0_hat)."""
    x0_hat = predicted_x0(x, velocity_fn(x, sigma), sigma)
    leaves, treedef = jax.tree.flatten(x0_hat)
    keys = jax.random.split(key, len(leaves))
    s = jnp.asarray(sigma_next, jnp.float32)
    out = [((1.0 - s) * a.astype(jnp.float32)
            + s * jax.random.normal(k, a.shape, jnp.float32)).astype(a.dtype)
           for a, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, out)


def few_step_sample(velocity_fn: VelocityFn, noise: PyTree, sigmas, key) -> PyTree:
    """Run every generator step from ``noise`` at sigmas[0]; step i uses ``fold_in(key, i)``."""
    sigmas = jnp.asarray(sigmas, jnp.float32)

    def body(i, x):
        return generator_step(velocity_fn, x, sigmas[i], sigmas[i + 1],
                              jax.random.fold_in(key, i))

    return jax.lax.fori_loop(0, sigmas.shape[0] - 1, body, noise)


def backward_simulate(velocity_fn: VelocityFn, noise: PyTree, sigmas, stop_index,
                      key) -> tuple[PyTree, jax.Array]:
    """The generator's own state at ``sigmas[stop_index]``: its first ``stop_index`` steps from
    ``noise`` (same keys as ``few_step_sample``), without gradient. ``stop_index`` may be traced
    (in [0, num_steps - 1]); 0 returns the noise. Returns ``(x, sigmas[stop_index])``."""
    sigmas = jnp.asarray(sigmas, jnp.float32)
    stop_index = jnp.asarray(stop_index, jnp.int32)
    fn = lambda x, s: jax.lax.stop_gradient(velocity_fn(x, s))

    def body(i, x):
        return generator_step(fn, x, sigmas[i], sigmas[i + 1], jax.random.fold_in(key, i))

    # A traced trip count makes this a while loop: only the steps needed run (no gradient
    # flows through it anyway).
    x = jax.lax.fori_loop(0, stop_index, body, noise)
    return jax.lax.stop_gradient(x), sigmas[stop_index]
