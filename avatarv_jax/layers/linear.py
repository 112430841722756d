"""A dense layer whose kernel and bias carry logical axis names."""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
from flax import nnx

from avatarv_jax.layers.initializers import Axes, make_param, xavier_uniform, zeros


class Dense(nnx.Module):
    """``y = x @ kernel + bias`` computed in ``dtype`` with fp32 parameters.

    ``kernel`` has shape ``(in_features, out_features)``: PyTorch ``nn.Linear`` weights are
    transposed on import.
    """

    def __init__(self, in_features: int, out_features: int, *, axes: Axes = ("embed", "mlp"),
                 use_bias: bool = True, dtype=jnp.float32, kernel_init: Callable = xavier_uniform,
                 bias_init: Callable = zeros, rngs: nnx.Rngs):
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.kernel = make_param(rngs, kernel_init, (in_features, out_features), axes)
        self.bias = (make_param(rngs, bias_init, (out_features,), (axes[-1],))
                     if use_bias else None)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y
