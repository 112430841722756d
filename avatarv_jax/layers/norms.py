"""Normalisations, always computed in fp32 (as Wan 2.1 does) and cast back."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from avatarv_jax.layers.initializers import make_param, ones, zeros


class RMSNorm(nnx.Module):
    """Root-mean-square norm over the last axis with an optional learned scale."""

    def __init__(self, dim: int, *, eps: float = 1e-6, use_scale: bool = True,
                 axis_name: str = "embed", rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.scale = make_param(rngs, ones, (dim,), (axis_name,)) if use_scale else None

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.scale is not None:
            y = y * self.scale[...].astype(jnp.float32)
        return y.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis in fp32; ``affine=False`` is Wan's parameter-free norm."""

    def __init__(self, dim: int, *, eps: float = 1e-6, affine: bool = True,
                 axis_name: str = "embed", rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.scale = make_param(rngs, ones, (dim,), (axis_name,)) if affine else None
        self.bias = make_param(rngs, zeros, (dim,), (axis_name,)) if affine else None

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            y = y * self.scale[...] + self.bias[...]
        return y.astype(x.dtype)
