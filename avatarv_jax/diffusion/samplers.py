"""ODE samplers for the rectified-flow velocity field, from sigma = 1 (noise) to 0 (data).

``velocity_fn(x, sigma) -> v`` takes the latent pytree and a scalar fp32 sigma and returns a
pytree of the same structure (guidance, caching and the timestep scale live inside it). The
loops are ``jax.lax`` loops whose body does not depend on the step index, so a jitted sampler
compiles the model once, whatever the number of steps.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from avatarv_jax.diffusion.flow import shift_sigma

PyTree = Any
VelocityFn = Callable[[PyTree, jax.Array], PyTree]

METHODS = ("euler", "heun")


def sigma_schedule(num_steps: int, *, shift: float = 1.0) -> jax.Array:
    """``num_steps + 1`` sigmas from 1 down to 0, uniform then shifted (``shift_sigma``)."""
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps}")
    return shift_sigma(jnp.linspace(1.0, 0.0, int(num_steps) + 1, dtype=jnp.float32), shift)


def _axpy(x: PyTree, dt: jax.Array, v: PyTree) -> PyTree:
    """``x + dt * v`` in fp32, cast back to each leaf's dtype."""
    return jax.tree.map(
        lambda a, b: (a.astype(jnp.float32) + dt * b.astype(jnp.float32)).astype(a.dtype), x, v)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; choose one of {METHODS}")


def step(velocity_fn: VelocityFn, x: PyTree, sigma: jax.Array, sigma_next: jax.Array, *,
         method: str = "euler") -> PyTree:
    """One step from ``sigma`` to ``sigma_next``.

    Euler: ``x + (s' - s) v(x, s)``, one model call, first order. Heun: the trapezoidal
    predictor-corrector, ``x + (s' - s) (v(x, s) + v(x_euler, s')) / 2``, two calls, second
    order. The corrector also runs on the last step, to sigma = 0: unlike a denoiser
    parameterisation (which divides by sigma), the velocity is well defined at sigma = 0
    (the network is simply fed timestep 0), so the last step keeps second order as well.
    """
    _check_method(method)
    sigma = jnp.asarray(sigma, jnp.float32)
    sigma_next = jnp.asarray(sigma_next, jnp.float32)
    dt = sigma_next - sigma
    v = velocity_fn(x, sigma)
    if method == "euler":
        return _axpy(x, dt, v)
    x_pred = _axpy(x, dt, v)
    v_next = velocity_fn(x_pred, sigma_next)
    v_mean = jax.tree.map(
        lambda a, b: 0.5 * (a.astype(jnp.float32) + b.astype(jnp.float32)), v, v_next)
    return _axpy(x, dt, v_mean)


def _check_sigmas(sigmas: jax.Array) -> jax.Array:
    sigmas = jnp.asarray(sigmas, jnp.float32)
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"sigmas must be a 1-D schedule of at least 2 values, got shape "
                         f"{sigmas.shape}")
    return sigmas


def sample(velocity_fn: VelocityFn, x_init: PyTree, sigmas: jax.Array, *,
           method: str = "euler") -> PyTree:
    """Integrate ``dx/dsigma = velocity_fn(x, sigma)`` along ``sigmas`` (e.g. 1 -> 0).

    ``sigmas`` may be traced; only its length is static. Model calls: ``len(sigmas) - 1`` for
    Euler, twice that for Heun.
    """
    _check_method(method)
    sigmas = _check_sigmas(sigmas)

    def body(i, x):
        return step(velocity_fn, x, sigmas[i], sigmas[i + 1], method=method)

    return jax.lax.fori_loop(0, sigmas.shape[0] - 1, body, x_init)


def sample_with_trajectory(velocity_fn: VelocityFn, x_init: PyTree, sigmas: jax.Array, *,
                           method: str = "euler") -> tuple[PyTree, PyTree]:
    """Like ``sample``, and also every intermediate state (for plots and Flow-GRPO style
    methods that need the path). Returns ``(x_final, trajectory)`` where each trajectory leaf
    has a leading axis of ``len(sigmas)``, entry 0 being ``x_init`` and the last ``x_final``.
    """
    _check_method(method)
    sigmas = _check_sigmas(sigmas)

    def body(x, pair):
        x_next = step(velocity_fn, x, pair[0], pair[1], method=method)
        return x_next, x_next

    x_final, states = jax.lax.scan(body, x_init, (sigmas[:-1], sigmas[1:]))
    trajectory = jax.tree.map(lambda a, s: jnp.concatenate([a[None], s], axis=0),
                              x_init, states)
    return x_final, trajectory
