"""Flow-GRPO's stochastic sampler: an SDE with the flow ODE's marginals and exact Gaussian steps.

GRPO needs a policy with a likelihood, and the ODE sampler is deterministic. For the rectified
flow ``x_s = (1 - s) x0 + s eps`` the velocity ``v = E[eps - x0 | x_s]`` also gives the score,
``grad log p_s(x) = -E[eps | x] / s = -(x + (1 - s) v) / s``. The reverse-time SDE

    dx = [v + g^2 / (2 s) (x + (1 - s) v)] ds + g dW,      ds < 0 (s runs from 1 to 0),

has, for every diffusion ``g(s)``, the same marginals as the probability-flow ODE ``dx = v ds``
(the extra drift ``-g^2/2 * score`` is exactly compensated by the noise). We use Flow-GRPO's
``g = noise_level * sqrt(s / (1 - s))``, which keeps the injected noise proportional to the
noise already in x. Euler-Maruyama makes each step an isotropic Gaussian,
``x' ~ N(mean = x + drift * dt, std = g * sqrt(-dt))``, whose log-density is exact
(``transition_logprob``): that is the log-probability GRPO's importance ratio needs.

At s = 1, ``g`` is infinite. The standard fix (Flow-GRPO's) evaluates ``g`` at a clamped
noise level: on a step that starts at s >= 1 we use the step's target ``sigma_next`` (the
schedule's second value) instead, optionally capped further by ``max_sigma``. The drift keeps
the true ``s``. With ``noise_level = 0`` a step is exactly the Euler ODE step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from avatarv_jax.diffusion.guidance import per_sample

PyTree = Any
VelocityFn = Callable[[PyTree, jax.Array], PyTree]


@flax.struct.dataclass
class SDETrajectory:
    """A sampled path: ``states`` (every leaf [S+1, B, ...], entry 0 the initial noise, the
    last the sample), ``logprobs`` [S, B] of each transition, ``means`` [S, B, ...] (or None)."""

    states: PyTree
    logprobs: jax.Array
    means: PyTree = None


def diffusion_coefficient(sigma, sigma_next, noise_level, max_sigma=None) -> jax.Array:
    """``g = noise_level * sqrt(s_c / (1 - s_c))`` at the clamped noise level ``s_c``: the step's
    own ``sigma``, or ``sigma_next`` when ``sigma >= 1`` (where g is infinite), capped at
    ``max_sigma`` if given."""
    sigma = jnp.asarray(sigma, jnp.float32)
    sigma_next = jnp.asarray(sigma_next, jnp.float32)
    s_c = jnp.where(sigma >= 1.0, sigma_next, sigma)
    if max_sigma is not None:
        s_c = jnp.minimum(s_c, jnp.asarray(max_sigma, jnp.float32))
    s_c = jnp.clip(s_c, 0.0, 1.0 - 1e-6)
    return jnp.asarray(noise_level, jnp.float32) * jnp.sqrt(s_c / (1.0 - s_c))


def sde_transition(x: PyTree, v: PyTree, sigma, sigma_next, noise_level,
                   max_sigma=None) -> tuple[PyTree, jax.Array]:
    """Mean (a pytree like ``x``, fp32) and std (scalar, or [B] for [B] sigmas) of the
    Euler-Maruyama step from ``sigma`` to ``sigma_next`` given the velocity ``v = v(x, sigma)``.

    ``mean = x + dt [v + g^2 / (2 sigma) (x + (1 - sigma) v)]``, ``std = g sqrt(-dt)``.
    """
    sigma = jnp.asarray(sigma, jnp.float32)
    sigma_next = jnp.asarray(sigma_next, jnp.float32)
    dt = sigma_next - sigma
    g = diffusion_coefficient(sigma, sigma_next, noise_level, max_sigma)
    coef = jnp.square(g) / (2.0 * jnp.maximum(sigma, 1e-6))

    def mean_of(a, b):
        a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
        s, c, d = (per_sample(t, a) for t in (sigma, coef, dt))
        return a32 + d * (b32 + c * (a32 + (1.0 - s) * b32))

    mean = jax.tree.map(mean_of, x, v)
    std = g * jnp.sqrt(jnp.maximum(-dt, 0.0))
    return mean, std


def transition_logprob(x_next: PyTree, mean: PyTree, std) -> jax.Array:
    """Exact log N(x_next; mean, std^2 I), summed over every non-batch element of every leaf
    -> [B]. ``std`` is a scalar or [B]; a zero std (noise_level 0) is clamped to 1e-20 so the
    result stays finite (and meaningless: the transition is deterministic)."""
    std = jnp.maximum(jnp.asarray(std, jnp.float32), 1e-20)

    def leaf_logprob(a, m):
        sd = per_sample(std, a)
        z = (a.astype(jnp.float32) - m.astype(jnp.float32)) / sd
        per = -0.5 * jnp.square(z) - jnp.log(sd) - 0.5 * math.log(2.0 * math.pi)
        per = jnp.broadcast_to(per, a.shape)
        return per.reshape(a.shape[0], -1).sum(axis=1)

    return sum(jax.tree.leaves(jax.tree.map(leaf_logprob, x_next, mean)))


def _draw(key: jax.Array, mean: PyTree, std, like: PyTree) -> PyTree:
    """``mean + std * z`` leaf by leaf (fresh normal z), cast to the dtypes of ``like``."""
    leaves, treedef = jax.tree.flatten(mean)
    keys = jax.random.split(key, len(leaves))
    like_leaves = jax.tree.leaves(like)
    out = [(m + per_sample(std, m) * jax.random.normal(k, m.shape, jnp.float32)).astype(l.dtype)
           for m, k, l in zip(leaves, keys, like_leaves)]
    return jax.tree.unflatten(treedef, out)


def sde_step(velocity_fn: VelocityFn, x: PyTree, sigma, sigma_next, noise_level, key,
             max_sigma=None) -> tuple[PyTree, jax.Array, PyTree]:
    """One stochastic step: ``(x_next, logprob [B] of x_next, mean)``."""
    mean, std = sde_transition(x, velocity_fn(x, sigma), sigma, sigma_next, noise_level,
                               max_sigma)
    x_next = _draw(key, mean, std, x)
    return x_next, transition_logprob(x_next, mean, std), mean


def sample_sde(velocity_fn: VelocityFn, x_init: PyTree, sigmas, noise_level, key, *,
               max_sigma=None, keep_means: bool = False) -> SDETrajectory:
    """Sample along ``sigmas`` (1 -> 0) with ``lax.scan``; step i uses ``fold_in(key, i)``.

    ``noise_level = 0`` reproduces ``diffusion.samplers.sample`` (Euler) exactly.
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"sigmas must be a 1-D schedule of at least 2 values, got shape "
                         f"{sigmas.shape}")

    def body(x, inputs):
        i, s, s_next = inputs
        x_next, logp, mean = sde_step(velocity_fn, x, s, s_next, noise_level,
                                      jax.random.fold_in(key, i), max_sigma)
        return x_next, (x_next, logp, mean if keep_means else None)

    steps = sigmas.shape[0] - 1
    _, (states, logprobs, means) = jax.lax.scan(
        body, x_init, (jnp.arange(steps), sigmas[:-1], sigmas[1:]))
    states = jax.tree.map(lambda a, s: jnp.concatenate([a[None], s], axis=0), x_init, states)
    return SDETrajectory(states=states, logprobs=logprobs, means=means)


def logprob_of_transition(velocity_fn: VelocityFn, x: PyTree, x_next: PyTree, sigma, sigma_next,
                          noise_level, max_sigma=None) -> jax.Array:
    """log p(x_next | x) [B] under ``velocity_fn`` (e.g. new parameters: GRPO's ratio)."""
    mean, std = sde_transition(x, velocity_fn(x, sigma), sigma, sigma_next, noise_level,
                               max_sigma)
    return transition_logprob(x_next, mean, std)
