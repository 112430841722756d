"""Layers of the causal video VAE, channels-last ``[B, T, H, W, C]``.

Every layer that looks at past frames takes the *cache* of its own input (the last frames it
saw, or ``None`` before the first chunk, meaning zeros) and returns the cache for the next
chunk. Running a video in chunks therefore gives the same numbers as running it whole.
Caches are nested dicts of arrays named after the submodules, so they are plain pytrees.

Attribute names follow diffusers' ``AutoencoderKLWan`` so imported weights map by name
(``docs/weights.md``).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from avatarv_jax.layers.initializers import make_param, zeros
from avatarv_jax.layers.linear import Dense

Cache = Any  # nested dict of arrays, or None before the first chunk

_conv_init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal")  # normal, not truncated: far cheaper to compile


def _conv(x: jax.Array, kernel: jax.Array, strides, padding) -> jax.Array:
    """N-d convolution, channels-last input and ``(*spatial, in, out)`` kernel."""
    n = kernel.ndim - 2
    if n == 3 and padding[0] == (0, 0) and jax.default_backend() == "cpu":
        return _conv3d_as_2d(x, kernel, strides, padding)
    spatial = "DHW"[-n:]
    dims = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
    return jax.lax.conv_general_dilated(x, kernel, tuple(strides), padding,
                                        dimension_numbers=dims)


def _conv3d_as_2d(x: jax.Array, kernel: jax.Array, strides, padding) -> jax.Array:
    """A 3D conv with no time padding as one 2D conv over time taps stacked into channels.

    Same maths; XLA:CPU runs its generic 3D convolution 7-14x slower (forward and gradient)
    than this form, so CPU training of the VAE uses it (``tests/test_vae_pretrain.py``).
    """
    kt, kh, kw, ci, co = kernel.shape
    st = strides[0]
    b, t = x.shape[:2]
    out_t = (t - kt) // st + 1
    taps = [x[:, i:i + st * (out_t - 1) + 1:st] for i in range(kt)]
    stacked = jnp.concatenate(taps, axis=-1) if kt > 1 else taps[0]
    stacked = stacked.reshape(b * out_t, *stacked.shape[2:])
    k2 = kernel.transpose(1, 2, 0, 3, 4).reshape(kh, kw, kt * ci, co)
    y = jax.lax.conv_general_dilated(stacked, k2, tuple(strides[1:]), list(padding[1:]),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y.reshape(b, out_t, *y.shape[1:])


def sub_cache(cache: Cache, key: str) -> Cache:
    """The cache of submodule ``key`` (``None`` before the first chunk)."""
    return None if cache is None else cache[key]


class CausalConv3d(nnx.Module):
    """3D convolution that sees only the present and the past in time.

    Spatial padding is symmetric ("same"); in time the ``kt - 1`` frames before the chunk
    come from the cache (zeros at the start of a video), never from the future.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel: tuple[int, int, int] = (3, 3, 3), *,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        self.kernel_size = tuple(kernel)
        self.kernel = make_param(rngs, _conv_init, (*kernel, in_dim, out_dim),
                                 (None, None, None, "conv_in", "conv_out"))
        self.bias = make_param(rngs, zeros, (out_dim,), ("conv_out",))

    @property
    def context(self) -> int:
        """How many past frames one output frame needs."""
        return self.kernel_size[0] - 1

    def conv(self, x: jax.Array, stride_t: int = 1) -> jax.Array:
        """The convolution with no padding in time (the caller supplies the past)."""
        _, kh, kw = self.kernel_size
        pad = [(0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)]
        y = _conv(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                  (stride_t, 1, 1), pad)
        return y + self.bias[...].astype(self.dtype)

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
        if self.context == 0:
            return self.conv(x), None
        if cache is None:
            cache = jnp.zeros((x.shape[0], self.context, *x.shape[2:]), x.dtype)
        x = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
        return self.conv(x), x[:, -self.context:]


class Conv2d(nnx.Module):
    """Per-frame 2D convolution (the spatial half of the resamplers)."""

    def __init__(self, in_dim: int, out_dim: int, *, stride: int = 1, padding=((1, 1), (1, 1)),
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        self.stride = stride
        self.padding = tuple(tuple(p) for p in padding)
        self.kernel = make_param(rngs, _conv_init, (3, 3, in_dim, out_dim),
                                 (None, None, "conv_in", "conv_out"))
        self.bias = make_param(rngs, zeros, (out_dim,), ("conv_out",))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t = x.shape[:2]
        y = _conv(x.reshape(b * t, *x.shape[2:]).astype(self.dtype),
                  self.kernel[...].astype(self.dtype), (self.stride, self.stride),
                  list(self.padding))
        y = y + self.bias[...].astype(self.dtype)
        return y.reshape(b, t, *y.shape[1:])


class WanRMSNorm(nnx.Module):
    """``x / ||x|| * sqrt(C) * gamma`` over channels, in fp32.

    Wan divides by the L2 norm clamped at 1e-12 instead of adding an epsilon under the root;
    the exact form is kept so imported weights reproduce the reference bit for bit.
    """

    def __init__(self, dim: int, *, rngs: nnx.Rngs | None = None):
        self.dim = dim
        self.gamma = make_param(rngs, nnx.initializers.ones_init(), (dim,), ("conv_out",))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
        y = xf / jnp.maximum(norm, 1e-12) * (math.sqrt(self.dim) * self.gamma[...])
        return y.astype(x.dtype)


class ResidualBlock(nnx.Module):
    """norm -> SiLU -> causal conv, twice, plus a (1x1x1 conv) shortcut."""

    def __init__(self, in_dim: int, out_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.norm1 = WanRMSNorm(in_dim, rngs=rngs)
        self.conv1 = CausalConv3d(in_dim, out_dim, dtype=dtype, rngs=rngs)
        self.norm2 = WanRMSNorm(out_dim, rngs=rngs)
        self.conv2 = CausalConv3d(out_dim, out_dim, dtype=dtype, rngs=rngs)
        self.conv_shortcut = (CausalConv3d(in_dim, out_dim, (1, 1, 1), dtype=dtype, rngs=rngs)
                              if in_dim != out_dim else None)

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)[0]
        y, c1 = self.conv1(jax.nn.silu(self.norm1(x)), sub_cache(cache, "conv1"))
        y, c2 = self.conv2(jax.nn.silu(self.norm2(y)), sub_cache(cache, "conv2"))
        return y + h, {"conv1": c1, "conv2": c2}


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the pixels of each frame (never across frames)."""

    def __init__(self, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        self.norm = WanRMSNorm(dim, rngs=rngs)
        self.to_qkv = Dense(dim, 3 * dim, axes=("conv_in", "conv_out"), dtype=dtype, rngs=rngs)
        self.proj = Dense(dim, dim, axes=("conv_in", "conv_out"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, h, w, c = x.shape
        q, k, v = jnp.split(self.to_qkv(self.norm(x).reshape(b * t, h * w, c)), 3, axis=-1)
        scores = jnp.einsum("nqc,nkc->nqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(scores / math.sqrt(c), axis=-1).astype(self.dtype)
        out = self.proj(jnp.einsum("nqk,nkc->nqc", probs, v))
        return x + out.reshape(b, t, h, w, c).astype(x.dtype)


class MidBlock(nnx.Module):
    """Residual block, attention, residual block: the bottleneck of encoder and decoder."""

    def __init__(self, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResidualBlock(dim, dim, dtype=dtype, rngs=rngs)
                                 for _ in range(2)])
        self.attentions = nnx.List([AttentionBlock(dim, dtype=dtype, rngs=rngs)])

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
        x, c0 = self.resnets[0](x, sub_cache(cache, "resnets.0"))
        x = self.attentions[0](x)
        x, c1 = self.resnets[1](x, sub_cache(cache, "resnets.1"))
        return x, {"resnets.0": c0, "resnets.1": c1}


RESAMPLE_MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")


class Resample(nnx.Module):
    """Halve or double height and width, and (``*3d`` modes) time.

    Time is resampled with the first frame kept alone, so ``1 + 2k`` frames <-> ``1 + k``:
    downsampling outputs frame 0 as is, then one frame per two inputs from a stride-2 conv over
    (previous, current pair); upsampling outputs frame 0 as is, then two frames per input
    from a causal conv with twice the channels. ``first`` says whether frame 0 is in this chunk.
    """

    def __init__(self, dim: int, mode: str, *, dtype=jnp.float32, rngs: nnx.Rngs):
        if mode not in RESAMPLE_MODES:
            raise ValueError(f"Resample mode must be one of {RESAMPLE_MODES}, got {mode!r}")
        self.mode = mode
        if mode.startswith("up"):
            # Wan 2.1 halves the channels in every upsampler.
            self.resample = Conv2d(dim, dim // 2, dtype=dtype, rngs=rngs)
        else:
            # Pad right/bottom only, then a stride-2 conv: exact halving of even sizes.
            self.resample = Conv2d(dim, dim, stride=2, padding=((0, 1), (0, 1)), dtype=dtype,
                                   rngs=rngs)
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), dtype=dtype, rngs=rngs)
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), dtype=dtype, rngs=rngs)
        else:
            self.time_conv = None

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
        new_cache = {}
        if self.mode == "upsample3d":
            x, new_cache["time_conv"] = self._time_up(x, sub_cache(cache, "time_conv"))
        if self.mode.startswith("up"):
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest, 2x
        x = self.resample(x)
        if self.mode == "downsample3d":
            x, new_cache["time_conv"] = self._time_down(x, sub_cache(cache, "time_conv"))
        return x, new_cache

    def _time_up(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        head = x[:, :1] if cache is None else None
        rest = x[:, 1:] if cache is None else x
        if cache is None:
            cache = jnp.zeros((x.shape[0], self.time_conv.context, *x.shape[2:]), x.dtype)
        if rest.shape[1] == 0:
            return head, cache
        y, cache = self.time_conv(rest, cache)
        b, t, h, w, c2 = y.shape
        # Channels [0, C) make frame 2j, [C, 2C) frame 2j + 1.
        y = y.reshape(b, t, h, w, 2, c2 // 2).transpose(0, 1, 4, 2, 3, 5)
        y = y.reshape(b, 2 * t, h, w, c2 // 2).astype(x.dtype)
        return (y if head is None else jnp.concatenate([head, y], axis=1)), cache

    def _time_down(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        dtype, new_cache = x.dtype, x[:, -1:]
        if cache is None:  # frame 0 passes alone, the rest pairs up after it
            if x.shape[1] % 2 != 1:
                raise ValueError(f"temporal downsampling of the first chunk needs an odd number "
                                 f"of frames, got {x.shape[1]}")
            head, x = x[:, :1], x
        else:
            if x.shape[1] % 2:
                raise ValueError(f"temporal downsampling of a later chunk needs an even number "
                                 f"of frames, got {x.shape[1]}")
            head, x = None, jnp.concatenate([cache.astype(x.dtype), x], axis=1)
        if x.shape[1] < 3:
            return head, new_cache
        y = self.time_conv.conv(x, stride_t=2).astype(dtype)
        return (y if head is None else jnp.concatenate([head, y], axis=1)), new_cache


class UpBlock(nnx.Module):
    """``num_res_blocks + 1`` residual blocks, then an optional upsampler (decoder stage)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, mode: str | None, *,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        self.resnets = nnx.List([ResidualBlock(a, b, dtype=dtype, rngs=rngs)
                                 for a, b in zip(dims[:-1], dims[1:])])
        self.upsamplers = (nnx.List([Resample(out_dim, mode, dtype=dtype, rngs=rngs)])
                           if mode else None)

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
        new_cache = {}
        for i, block in enumerate(self.resnets):
            x, new_cache[f"resnets.{i}"] = block(x, sub_cache(cache, f"resnets.{i}"))
        if self.upsamplers is not None:
            x, new_cache["upsamplers.0"] = self.upsamplers[0](x, sub_cache(cache, "upsamplers.0"))
        return x, new_cache
