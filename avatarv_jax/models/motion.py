"""The motion stream: per-video-frame motion vectors <-> one token per latent frame.

The causal VAE maps video frames ``1 + 4k`` to latent frames ``1 + k``: latent frame 0 holds
video frame 0 alone, latent frame ``l >= 1`` holds video frames ``4l-3 .. 4l``. Motion follows
the same grouping so each latent frame gets exactly one motion token: the vectors of its four
video frames concatenated (frame 0 repeated four times). This packing is exact and invertible,
so the flow is run directly on packed motion and decoded by ``unpack_motion``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from avatarv_jax.layers.initializers import make_param, normal, zeros
from avatarv_jax.layers.linear import Dense
from avatarv_jax.layers.norms import LayerNorm

TEMPORAL_STRIDE = 4


def num_latent_frames(num_video_frames: int) -> int:
    if num_video_frames < 1 or (num_video_frames - 1) % TEMPORAL_STRIDE:
        raise ValueError(f"{num_video_frames} video frames: the causal VAE needs 1 + 4k frames")
    return 1 + (num_video_frames - 1) // TEMPORAL_STRIDE


def pack_motion(motion: jnp.ndarray) -> jnp.ndarray:
    """[B, 1 + 4k, M] per-frame vectors -> [B, 1 + k, 4M] per-latent-frame vectors."""
    b, t, m = motion.shape
    num_latent_frames(t)
    first = jnp.repeat(motion[:, :1], TEMPORAL_STRIDE, axis=1).reshape(b, 1, TEMPORAL_STRIDE * m)
    rest = motion[:, 1:].reshape(b, (t - 1) // TEMPORAL_STRIDE, TEMPORAL_STRIDE * m)
    return jnp.concatenate([first, rest], axis=1)


def unpack_motion(packed: jnp.ndarray) -> jnp.ndarray:
    """[B, 1 + k, 4M] -> [B, 1 + 4k, M]; latent frame 0 averages its four copies."""
    b, f, d = packed.shape
    m = d // TEMPORAL_STRIDE
    grouped = packed.reshape(b, f, TEMPORAL_STRIDE, m)
    first = grouped[:, :1].mean(axis=2)
    return jnp.concatenate([first, grouped[:, 1:].reshape(b, -1, m)], axis=1)


class MotionEncoder(nnx.Module):
    """Packed motion [B, F, 4M] -> one token per latent frame [B, F, 1, D]."""

    def __init__(self, packed_dim: int, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.fc_in = Dense(packed_dim, dim, axes=(None, "embed"), dtype=dtype, rngs=rngs)
        self.fc_out = Dense(dim, dim, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)

    def __call__(self, packed: jnp.ndarray) -> jnp.ndarray:
        return self.fc_out(jax.nn.silu(self.fc_in(packed)))[:, :, None, :]


class MotionHead(nnx.Module):
    """Motion tokens [B, F, D] -> packed motion velocity [B, F, 4M], adaLN-modulated per frame."""

    def __init__(self, dim: int, packed_dim: int, *, eps: float = 1e-6, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.norm = LayerNorm(dim, eps=eps, affine=False)
        self.scale_shift_table = make_param(rngs, normal(dim ** -0.5), (2, dim), (None, "embed"))
        self.proj = Dense(dim, packed_dim, axes=("embed", None), dtype=dtype, kernel_init=zeros,
                          rngs=rngs)

    def __call__(self, tokens: jnp.ndarray, temb: jnp.ndarray) -> jnp.ndarray:
        mod = self.scale_shift_table[...][None, None] + temb[:, :, None, :].astype(jnp.float32)
        shift, scale = mod[:, :, 0], mod[:, :, 1]
        x = self.norm(tokens.astype(jnp.float32)) * (1 + scale) + shift
        return self.proj(x.astype(tokens.dtype))
