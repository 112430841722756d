"""A 2-D mixture-of-Gaussians flow problem with an exact velocity: the known teacher the
post-training algorithms are tested on.

C classes (conditions), each a few narrow isotropic Gaussian components. Under
``x_s = (1 - s) x0 + s eps`` a component ``N(mu, r^2 I)`` becomes ``N((1 - s) mu, var I)``,
``var = (1 - s)^2 r^2 + s^2``, and given the component, ``(x0, eps)`` are jointly Gaussian with
x_s, so ``E[x0 | x, k] = mu + (1 - s) r^2 / var (x - (1 - s) mu)`` and
``E[eps | x, k] = s / var (x - (1 - s) mu)``. The exact velocity is the posterior-weighted
``E[eps - x0 | x]`` over the components the condition allows (all of them for the
unconditional model, ``cond = -1``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

UNCONDITIONAL = -1


@dataclasses.dataclass(frozen=True)
class ToyMixture:
    """Component means [K, 2], radii [K], classes [K] and weights [K] (normalised per class;
    every class has equal mass in the unconditional mixture)."""

    means: np.ndarray
    radii: np.ndarray
    classes: np.ndarray
    weights: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(self.classes.max()) + 1


def default_mixture(num_classes: int = 3, per_class: int = 2, radius: float = 0.12,
                    scale: float = 1.5) -> ToyMixture:
    """``num_classes * per_class`` components on a circle of radius ``scale``, classes
    interleaved so every class is multi-modal and its modes sit far apart."""
    k = num_classes * per_class
    angles = 2 * np.pi * np.arange(k) / k
    means = scale * np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    classes = (np.arange(k) % num_classes).astype(np.int32)
    return ToyMixture(means=means, radii=np.full(k, radius, np.float32), classes=classes,
                      weights=np.full(k, 1.0 / per_class, np.float32))


def _cond_array(cond, batch: int) -> jax.Array:
    if cond is None:
        return jnp.full((batch,), UNCONDITIONAL, jnp.int32)
    cond = jnp.asarray(cond, jnp.int32)
    return jnp.broadcast_to(cond, (batch,))


def _component_logits(mix: ToyMixture, cond: jax.Array) -> jax.Array:
    """Log prior [B, K] of each component given the condition (-inf outside the class)."""
    classes = jnp.asarray(mix.classes)
    allowed = (cond[:, None] == UNCONDITIONAL) | (cond[:, None] == classes[None])
    return jnp.where(allowed, jnp.log(jnp.asarray(mix.weights))[None], -jnp.inf)


def sample_data(mix: ToyMixture, key: jax.Array, n: int, cond=None) -> jax.Array:
    """n samples [n, 2] of class ``cond`` (int, [n] ints, or None / -1 for the mixture)."""
    cond = _cond_array(cond, n)
    k_comp, k_noise = jax.random.split(key)
    comp = jax.random.categorical(k_comp, _component_logits(mix, cond), axis=-1)
    means = jnp.asarray(mix.means)[comp]
    radii = jnp.asarray(mix.radii)[comp][:, None]
    return means + radii * jax.random.normal(k_noise, (n, 2), jnp.float32)


def analytic_velocity(mix: ToyMixture, x: jax.Array, sigma, cond=None) -> jax.Array:
    """The exact rectified-flow velocity ``E[eps - x0 | x_sigma = x, cond]`` [B, 2]; sigma a
    scalar or [B]."""
    x = jnp.asarray(x, jnp.float32)
    b = x.shape[0]
    s = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (b,))[:, None]      # [B, 1]
    mu = jnp.asarray(mix.means)[None]                                        # [1, K, 2]
    r2 = jnp.square(jnp.asarray(mix.radii))[None]                            # [1, K]
    var = jnp.square(1.0 - s) * r2 + jnp.square(s)                           # [B, K]
    diff = x[:, None, :] - (1.0 - s)[..., None] * mu                          # [B, K, 2]
    log_lik = -0.5 * jnp.sum(jnp.square(diff), -1) / var - jnp.log(var)      # 2-D Gaussian
    post = jax.nn.softmax(_component_logits(mix, _cond_array(cond, b)) + log_lik, axis=-1)
    e_x0 = mu + ((1.0 - s) * r2 / var)[..., None] * diff
    e_eps = (s / var)[..., None] * diff
    return jnp.sum(post[..., None] * (e_eps - e_x0), axis=1)


def log_density(mix: ToyMixture, x: jax.Array, cond=None) -> jax.Array:
    """log p(x0 = x | cond) [B] of the data distribution."""
    x = jnp.asarray(x, jnp.float32)
    r2 = jnp.square(jnp.asarray(mix.radii))[None]
    d2 = jnp.sum(jnp.square(x[:, None] - jnp.asarray(mix.means)[None]), -1)
    log_n = -0.5 * d2 / r2 - jnp.log(2 * math.pi * r2)
    logits = jax.nn.log_softmax(_component_logits(mix, _cond_array(cond, x.shape[0])), -1)
    return jax.nn.logsumexp(logits + log_n, axis=-1)


def _fourier(values: jax.Array, num: int, max_freq: float = 64.0) -> jax.Array:
    """Sinusoidal features of [B] values at geometric frequencies 1..max_freq (like a timestep
    embedding)."""
    freqs = jnp.exp(jnp.linspace(0.0, math.log(max_freq), num))
    angles = values[:, None] * freqs[None]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class VelocityMLP(nnx.Module):
    """A small velocity network ``(x [B, 2], sigma, cond [B] | None, guidance [B] | None)``:
    x, sigma features and a class embedding (index C is the null class, used for cond = -1) are
    summed into a SiLU MLP; with ``guidance_features`` the guidance scale is embedded the same
    way and added too."""

    def __init__(self, num_classes: int, *, width: int = 128, depth: int = 3,
                 guidance_features: bool = False, rngs: nnx.Rngs):
        self.num_classes = num_classes
        self.inp = nnx.Linear(2, width, rngs=rngs)
        self.sigma_proj = nnx.Linear(16, width, rngs=rngs)
        self.class_embed = nnx.Embed(num_classes + 1, width, rngs=rngs)
        self.guidance_proj = nnx.Linear(16, width, rngs=rngs) if guidance_features else None
        self.hidden = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(depth - 1)])
        self.out = nnx.Linear(width, 2, rngs=rngs)

    def __call__(self, x, sigma, cond=None, guidance=None):
        b = x.shape[0]
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (b,))
        cond = _cond_array(cond, b)
        cond = jnp.where(cond < 0, self.num_classes, cond)
        h = self.inp(x) + self.sigma_proj(_fourier(sigma, 8)) + self.class_embed(cond)
        if self.guidance_proj is not None:
            if guidance is None:
                raise ValueError("this VelocityMLP is guidance-conditioned: pass guidance [B]")
            g = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (b,))
            # Low frequencies only: the velocity is smooth in the scale, and scales between
            # the trained ones must interpolate.
            h = h + self.guidance_proj(_fourier(g / 8.0, 8, max_freq=4.0))
        for layer in self.hidden:
            h = layer(jax.nn.silu(h))
        return self.out(jax.nn.silu(h))


def mmd(x: jax.Array, y: jax.Array, bandwidths: Sequence[float] = (0.1, 0.3, 1.0), *,
        unbiased: bool = True) -> jax.Array:
    """Squared maximum mean discrepancy with a sum of RBF kernels ``exp(-|a-b|^2 / (2 h^2))``.

    Unbiased (default): the U-statistic, diagonal terms left out of the within-set means, so
    its expectation is exactly MMD^2 (it can be slightly negative); biased: the V-statistic
    (always >= 0, biased up by O(1/n)).
    """
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)

    def kernel(a, b):
        d2 = jnp.sum(jnp.square(a[:, None] - b[None]), -1)
        return sum(jnp.exp(-d2 / (2.0 * h * h)) for h in bandwidths)

    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    n, m = x.shape[0], y.shape[0]
    if unbiased:
        sxx = (kxx.sum() - jnp.trace(kxx)) / (n * (n - 1))
        syy = (kyy.sum() - jnp.trace(kyy)) / (m * (m - 1))
    else:
        sxx, syy = kxx.mean(), kyy.mean()
    return sxx + syy - 2.0 * kxy.mean()


def fit(model: nnx.Module, loss_fn: Callable[[nnx.Module, jax.Array], jax.Array],
        key: jax.Array, *, steps: int, learning_rate: float = 1e-3) -> nnx.Module:
    """Train ``model`` in place by Adam (cosine decay) on ``loss_fn(model, key_i)`` for
    ``steps`` steps, one jitted ``lax.scan``. Returns the model."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps, alpha=0.05))

    def step(carry, k):
        p, opt = carry
        loss, grads = jax.value_and_grad(
            lambda q: loss_fn(nnx.merge(graphdef, q, rest), k))(p)
        updates, opt = tx.update(grads, opt, p)
        return (optax.apply_updates(p, updates), opt), loss

    @jax.jit
    def run(p, k):
        (p, _), losses = jax.lax.scan(step, (p, tx.init(p)), jax.random.split(k, steps))
        return p, losses

    params, _ = run(params, key)
    nnx.update(model, params)
    return model


def train_flow_matching(mix: ToyMixture, key: jax.Array, *, steps: int = 2000,
                        batch: int = 256, width: int = 128,
                        learning_rate: float = 2e-3) -> VelocityMLP:
    """A class-conditional VelocityMLP trained by flow matching on the mixture (10% of the
    conditions dropped to the null class, so it also models the mixture): a network teacher."""
    k_init, k_train = jax.random.split(key)
    model = VelocityMLP(mix.num_classes, width=width, rngs=nnx.Rngs(k_init))

    def loss_fn(m, k):
        k_c, k_x, k_e, k_s, k_d = jax.random.split(k, 5)
        cond = jax.random.randint(k_c, (batch,), 0, mix.num_classes)
        x0 = sample_data(mix, k_x, batch, cond)
        eps = jax.random.normal(k_e, x0.shape)
        s = jax.random.uniform(k_s, (batch,))
        cond = jnp.where(jax.random.bernoulli(k_d, 0.1, (batch,)), UNCONDITIONAL, cond)
        x_t = (1 - s)[:, None] * x0 + s[:, None] * eps
        return jnp.mean(jnp.square(m(x_t, s, cond) - (eps - x0)))

    return fit(model, loss_fn, k_train, steps=steps, learning_rate=learning_rate)
