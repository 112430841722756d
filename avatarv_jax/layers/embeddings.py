"""Timestep embeddings (sinusoidal features + MLP), in the Wan 2.1 / diffusers layout."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from avatarv_jax.layers.linear import Dense


def sinusoidal_embedding(t: jnp.ndarray, dim: int, max_period: float = 10000.0) -> jnp.ndarray:
    """[..., dim] features ``[cos(t f_i), sin(t f_i)]`` with ``f_i = max_period^(-i/(dim/2))``.

    The cosine half comes first, as in Wan 2.1 (diffusers ``flip_sin_to_cos=True``,
    ``downscale_freq_shift=0``).
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepMLP(nnx.Module):
    """sinusoidal features -> Linear -> SiLU -> Linear (diffusers ``TimestepEmbedding``)."""

    def __init__(self, freq_dim: int, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.freq_dim = freq_dim
        self.linear_1 = Dense(freq_dim, dim, axes=(None, "embed"), dtype=dtype, rngs=rngs)
        self.linear_2 = Dense(dim, dim, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)

    def __call__(self, t: jnp.ndarray) -> jnp.ndarray:
        return self.linear_2(jax.nn.silu(self.linear_1(sinusoidal_embedding(t, self.freq_dim))))
