"""Samplers against an exactly solvable flow: Gaussian data, Gaussian noise.

Data x0 ~ N(m, s^2) per dimension, noise z ~ N(0, 1), x = (1 - sigma) x0 + sigma z. Then
x ~ N((1 - sigma) m, V) with V(sigma) = (1 - sigma)^2 s^2 + sigma^2, and the covariances
cov(z, x) = sigma, cov(x0, x) = (1 - sigma) s^2 give the exact velocity

    v(x, sigma) = E[z - x0 | x] = -m + (sigma - (1 - sigma) s^2) / V * (x - (1 - sigma) m).

Its ODE solution is x(sigma) = (1 - sigma) m + sqrt(V(sigma)) z, so it carries noise z at
sigma = 1 to m + s z at sigma = 0.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avatarv_jax.diffusion.flow import shift_sigma
from avatarv_jax.diffusion.samplers import sample, sample_with_trajectory, sigma_schedule, step

M = jnp.array([0.7, -1.2, 2.0, 0.0])
S = jnp.array([0.5, 1.5, 2.0, 0.8])


def gaussian_velocity(x, sigma):
    var = (1 - sigma) ** 2 * S**2 + sigma**2
    return -M + (sigma - (1 - sigma) * S**2) / var * (x - (1 - sigma) * M)


def exact_path(z, sigma):
    return (1 - sigma) * M + jnp.sqrt((1 - sigma) ** 2 * S**2 + sigma**2) * z


@pytest.fixture(scope="module")
def noise():
    return jax.random.normal(jax.random.key(0), (32, 4))


def test_exact_velocity_is_derivative_of_exact_path(noise):
    # Guards the test problem itself: finite difference of the path equals the field.
    for sigma in (0.1, 0.5, 0.9):
        h = 1e-3
        fd = (exact_path(noise, sigma + h) - exact_path(noise, sigma - h)) / (2 * h)
        np.testing.assert_allclose(fd, gaussian_velocity(exact_path(noise, sigma), sigma),
                                   atol=2e-3)


@pytest.mark.parametrize("method,order", [("euler", 1.0), ("heun", 2.0)])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_convergence_order(noise, method, order, shift):
    run = jax.jit(lambda sigmas: sample(gaussian_velocity, noise, sigmas, method=method))
    target = M + S * noise
    steps = [8, 16, 32, 64]
    errors = [float(jnp.sqrt(jnp.mean((run(sigma_schedule(n, shift=shift)) - target) ** 2)))
              for n in steps]
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(slope + order) < 0.3, (errors, slope)
    assert errors[-1] < (0.05 if method == "euler" else 1e-3)


def test_heun_much_more_accurate_than_euler_at_equal_steps(noise):
    sigmas = sigma_schedule(16)
    target = M + S * noise
    err_e = jnp.max(jnp.abs(sample(gaussian_velocity, noise, sigmas, method="euler") - target))
    err_h = jnp.max(jnp.abs(sample(gaussian_velocity, noise, sigmas, method="heun") - target))
    assert err_h < err_e / 10


def test_single_steps_are_exact_where_theory_says():
    x = jnp.array([1.0, -2.0])
    # Constant velocity: Euler is exact in one step.
    out = step(lambda x, s: jnp.array([3.0, 0.5]), x, 1.0, 0.25, method="euler")
    np.testing.assert_allclose(out, x - 0.75 * jnp.array([3.0, 0.5]), rtol=1e-6)
    # Velocity linear in sigma: the trapezoid rule (Heun) is exact, Euler is not.
    a, b = jnp.array([0.3, -1.0]), jnp.array([2.0, 1.5])
    linear = lambda x, s: a + b * s
    exact = x + a * (0.0 - 1.0) + b * (0.0 - 1.0) / 2   # integral of a + b s from 1 to 0
    np.testing.assert_allclose(step(linear, x, 1.0, 0.0, method="heun"), exact, rtol=1e-6)
    assert not np.allclose(step(linear, x, 1.0, 0.0, method="euler"), exact)


def test_heun_corrector_runs_on_last_step_to_zero():
    seen = []

    def velocity(x, sigma):
        seen.append(sigma)
        return x

    sample(velocity, jnp.ones(2), jnp.array([1.0, 0.0]), method="heun")
    assert len(seen) == 2   # predictor at 1, corrector at 0: traced once each
    out = sample(lambda x, s: x, jnp.ones(2), jnp.array([1.0, 0.0]), method="heun")
    # dx/ds = x from 1 to 0 with one Heun step: x (1 - 1 + 1/2) = 0.5 x.
    np.testing.assert_allclose(out, 0.5 * jnp.ones(2), rtol=1e-6)


def test_pytree_state_and_dtypes():
    x = {"video": jnp.ones((2, 3, 4, 4, 2), jnp.bfloat16), "motion": jnp.ones((2, 3, 5))}
    out = jax.jit(lambda x: sample(lambda x, s: jax.tree.map(lambda a: -a, x), x,
                                   sigma_schedule(4), method="heun"))(x)
    assert out["video"].dtype == jnp.bfloat16 and out["motion"].dtype == jnp.float32
    assert out["video"].shape == (2, 3, 4, 4, 2) and out["motion"].shape == (2, 3, 5)
    # dx/ds = -x over four steps of ds = -1/4: each Heun step multiplies by 1 + h + h^2/2
    # with h = 1/4 (the exact solution would multiply by e overall).
    gain = (1 + 0.25 + 0.25**2 / 2) ** 4
    np.testing.assert_allclose(out["motion"], gain * np.ones((2, 3, 5)), rtol=1e-6)
    np.testing.assert_allclose(out["video"].astype(jnp.float32), gain, rtol=2e-2)


def test_trajectory_matches_sample_and_path(noise):
    sigmas = sigma_schedule(32, shift=2.0)
    final, traj = sample_with_trajectory(gaussian_velocity, noise, sigmas, method="heun")
    np.testing.assert_allclose(final, sample(gaussian_velocity, noise, sigmas, method="heun"),
                               rtol=1e-5, atol=1e-6)
    assert traj.shape == (33, 32, 4)
    np.testing.assert_array_equal(traj[0], noise)
    np.testing.assert_array_equal(traj[-1], final)
    # Every intermediate state lies on the exact path at its sigma.
    expected = jax.vmap(lambda s: exact_path(noise, s))(sigmas)
    np.testing.assert_allclose(traj, expected, atol=5e-3)


def test_sigma_schedule():
    sched = sigma_schedule(10, shift=3.0)
    assert sched.shape == (11,)
    assert float(sched[0]) == 1.0 and float(sched[-1]) == 0.0
    assert bool(jnp.all(jnp.diff(sched) < 0))
    np.testing.assert_allclose(sched, shift_sigma(np.linspace(1, 0, 11), 3.0), rtol=1e-6)
    # Shift > 1 spends more steps at high noise: the midpoint moves up to 3/4.
    np.testing.assert_allclose(sched[5], 0.75, rtol=1e-6)
    np.testing.assert_allclose(sigma_schedule(4), [1.0, 0.75, 0.5, 0.25, 0.0], rtol=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="unknown sampling method 'rk4'"):
        sample(gaussian_velocity, jnp.zeros(4), sigma_schedule(2), method="rk4")
    with pytest.raises(ValueError, match="unknown sampling method"):
        sample_with_trajectory(gaussian_velocity, jnp.zeros(4), sigma_schedule(2), method="x")
    with pytest.raises(ValueError, match="at least 2 values"):
        sample(gaussian_velocity, jnp.zeros(4), jnp.array([1.0]))
    with pytest.raises(ValueError, match="positive integer"):
        sigma_schedule(0)
