"""A dense layer whose kernel and bias carry logical axis names."""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from avatarv_jax.layers.initializers import Axes, make_param, xavier_uniform, zeros


# cuBLAS's fast (sm90) GEMM kernels need leading dimensions that are multiples of 8 bf16
# elements. XLA's GPU layout assignment stores some backward-pass GEMM outputs token-minor, so
# an odd token count (a latent frame is 1,560 patches + the motion token) falls back to slow
# align-1 kernels (11 % of the 1.3B step on an H100). Dense pads the token axis instead.
ROW_ALIGNMENT = 8
MIN_PADDED_ROWS = 4096       # small products are not worth a copy
# "auto": pad on GPUs only; "on"/"off" force it (tests, A/B benchmarks).
row_padding = "auto"


def _token_padding(x) -> int:
    """Tokens to append on axis -2 so that the GEMM's row count is a multiple of 8."""
    enabled = row_padding == "on" or (row_padding == "auto" and jax.default_backend() == "gpu")
    rows = math.prod(x.shape[:-1])
    if not enabled or x.ndim < 3 or rows < MIN_PADDED_ROWS or rows % ROW_ALIGNMENT == 0:
        return 0
    return -x.shape[-2] % ROW_ALIGNMENT


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
        x = x.astype(self.dtype)
        pad = _token_padding(x)
        if pad:
            x = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, pad), (0, 0)])
        y = jnp.dot(x, self.kernel[...].astype(self.dtype))
        if pad:
            y = y[..., :-pad, :]
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y
