"""The causal 3D video VAE (Wan 2.1 layout): whole-video and chunk-by-chunk encode/decode.

Videos are ``[B, T, H, W, 3]`` in ``[-1, 1]``; latents are ``[B, 1 + (T - 1) / 4, H / 8,
W / 8, z_dim]``, normalised per channel with the config's ``latents_mean``/``latents_std``
(what the DiT sees). Time is causal everywhere, so a video can be processed in chunks with a
``StreamCache`` carried between them and gives the same result as processing it whole:

- encode: the first chunk holds ``1 + 4k`` frames (``k >= 0``; the first frame is encoded
  alone, so ``1`` is the usual choice), every later chunk a positive multiple of 4 frames;
  each chunk of ``n`` frames yields ``n / 4`` latent frames (``1 + k`` for the first).
- decode: any number of latent frames per chunk; latent frame 0 gives 1 video frame, every
  later latent frame 4.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from avatarv_jax.models.vae.blocks import (Cache, CausalConv3d, MidBlock, Resample,
                                           ResidualBlock, UpBlock, WanRMSNorm, sub_cache)
from avatarv_jax.models.vae.config import VAEConfig


@dataclasses.dataclass(frozen=True)
class StreamCache:
    """What a streaming encode or decode carries from one chunk to the next.

    ``tensors`` is ``None`` before the first chunk (the past is zeros), then a nested dict of
    the last input frames of every causal layer. A pytree: pass it through ``jax.jit``.
    ``kind`` ("encode"/"decode") is static and guards against mixing the two.
    """

    kind: str
    tensors: Any = None

    @property
    def started(self) -> bool:
        return self.tensors is not None


jax.tree_util.register_dataclass(StreamCache, data_fields=["tensors"], meta_fields=["kind"])


class Encoder(nnx.Module):
    """Video -> posterior moments ``[B, T', H/8, W/8, 2 * z_dim]`` (before ``quant_conv``)."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        dt = cfg.dtype
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], dtype=dt, rngs=rngs)
        blocks = []
        last = len(cfg.dim_mult) - 1
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, dtype=dt, rngs=rngs))
                in_dim = out_dim
            if i != last:
                mode = "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"
                blocks.append(Resample(out_dim, mode, dtype=dt, rngs=rngs))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], dtype=dt, rngs=rngs)
        self.norm_out = WanRMSNorm(dims[-1], rngs=rngs)
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, dtype=dt, rngs=rngs)

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
        new = {}
        x, new["conv_in"] = self.conv_in(x, sub_cache(cache, "conv_in"))
        for i, block in enumerate(self.down_blocks):
            x, new[f"down_blocks.{i}"] = block(x, sub_cache(cache, f"down_blocks.{i}"))
        x, new["mid_block"] = self.mid_block(x, sub_cache(cache, "mid_block"))
        x, new["conv_out"] = self.conv_out(jax.nn.silu(self.norm_out(x)),
                                           sub_cache(cache, "conv_out"))
        return x, new


class Decoder(nnx.Module):
    """Latents (after ``post_quant_conv``) -> video ``[B, T, H, W, 3]`` (unclamped)."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        dt = cfg.dtype
        mult = cfg.dim_mult
        dims = [cfg.base_dim * m for m in (mult[-1], *mult[::-1])]
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], dtype=dt, rngs=rngs)
        self.mid_block = MidBlock(dims[0], dtype=dt, rngs=rngs)
        blocks = []
        last = len(mult) - 1
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous stage's upsampler halved the channels
            mode = None
            if i != last:
                mode = "upsample3d" if temporal_upsample[i] else "upsample2d"
            blocks.append(UpBlock(in_dim, out_dim, cfg.num_res_blocks, mode, dtype=dt,
                                  rngs=rngs))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = WanRMSNorm(dims[-1], rngs=rngs)
        self.conv_out = CausalConv3d(dims[-1], cfg.in_channels, dtype=dt, rngs=rngs)

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
        new = {}
        x, new["conv_in"] = self.conv_in(x, sub_cache(cache, "conv_in"))
        x, new["mid_block"] = self.mid_block(x, sub_cache(cache, "mid_block"))
        for i, block in enumerate(self.up_blocks):
            x, new[f"up_blocks.{i}"] = block(x, sub_cache(cache, f"up_blocks.{i}"))
        x, new["conv_out"] = self.conv_out(jax.nn.silu(self.norm_out(x)),
                                           sub_cache(cache, "conv_out"))
        return x, new


class CausalVideoVAE(nnx.Module):
    """Encoder + decoder with Wan 2.1's names, so ``import_wan_vae`` maps weights 1:1."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        z = cfg.z_dim
        self.encoder = Encoder(cfg, rngs=rngs)
        self.quant_conv = CausalConv3d(2 * z, 2 * z, (1, 1, 1), dtype=cfg.dtype, rngs=rngs)
        self.post_quant_conv = CausalConv3d(z, z, (1, 1, 1), dtype=cfg.dtype, rngs=rngs)
        self.decoder = Decoder(cfg, rngs=rngs)

    # ---- latent normalisation -------------------------------------------------------------

    def normalize_latents(self, mu: jax.Array) -> jax.Array:
        mean = jnp.asarray(self.config.latents_mean, jnp.float32)
        std = jnp.asarray(self.config.latents_std, jnp.float32)
        return (mu.astype(jnp.float32) - mean) / std

    def denormalize_latents(self, z: jax.Array) -> jax.Array:
        mean = jnp.asarray(self.config.latents_mean, jnp.float32)
        std = jnp.asarray(self.config.latents_std, jnp.float32)
        return z.astype(jnp.float32) * std + mean

    # ---- streaming --------------------------------------------------------------------------

    def init_encode_cache(self) -> StreamCache:
        return StreamCache("encode")

    def init_decode_cache(self) -> StreamCache:
        return StreamCache("decode")

    def encode_moments_chunk(self, cache: StreamCache, frames: jax.Array
                             ) -> tuple[StreamCache, jax.Array, jax.Array]:
        """Posterior ``(mean, logvar)`` of one chunk, unnormalised, fp32."""
        self._check_cache(cache, "encode")
        self._check_video(frames, cache)
        h, tensors = self.encoder(frames.astype(self.config.dtype), cache.tensors)
        h = self.quant_conv(h)[0].astype(jnp.float32)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return StreamCache("encode", tensors), mean, jnp.clip(logvar, -30.0, 20.0)

    def encode_chunk(self, cache: StreamCache, frames: jax.Array, *,
                     rng: jax.Array | None = None) -> tuple[StreamCache, jax.Array]:
        """Normalised latents of one chunk: the posterior mean, or a sample when ``rng``."""
        cache, mean, logvar = self.encode_moments_chunk(cache, frames)
        if rng is not None:
            mean = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
        return cache, self.normalize_latents(mean)

    def decode_chunk(self, cache: StreamCache, latents: jax.Array
                     ) -> tuple[StreamCache, jax.Array]:
        """Video frames of a chunk of normalised latents, clamped to ``[-1, 1]``."""
        self._check_cache(cache, "decode")
        self._check_latents(latents, cache)
        z = self.denormalize_latents(latents).astype(self.config.dtype)
        x, tensors = self.decoder(self.post_quant_conv(z)[0], cache.tensors)
        return StreamCache("decode", tensors), jnp.clip(x, -1.0, 1.0)

    # ---- whole videos -----------------------------------------------------------------------

    def encode(self, video: jax.Array, *, sample: bool = False,
               rng: jax.Array | None = None) -> jax.Array:
        """``[B, 1 + 4k, H, W, 3]`` -> normalised latents ``[B, 1 + k, H/8, W/8, z_dim]``.

        The posterior mean by default; ``sample=True`` draws ``mean + std * eps`` with ``rng``.
        """
        if sample and rng is None:
            raise ValueError("encode(sample=True) needs an rng key")
        return self.encode_chunk(self.init_encode_cache(), video,
                                 rng=rng if sample else None)[1]

    def decode(self, latents: jax.Array) -> jax.Array:
        """Normalised latents ``[B, 1 + k, h, w, z_dim]`` -> video ``[B, 1 + 4k, 8h, 8w, 3]``."""
        return self.decode_chunk(self.init_decode_cache(), latents)[1]

    # ---- input checks (run at trace time: shapes are static) --------------------------------

    def _check_cache(self, cache: StreamCache, kind: str):
        if not isinstance(cache, StreamCache) or cache.kind != kind:
            got = cache.kind if isinstance(cache, StreamCache) else type(cache).__name__
            raise TypeError(f"{kind}_chunk needs the cache from init_{kind}_cache() or the "
                            f"previous {kind}_chunk, got a {got!r} cache")

    def _check_spatial(self, x: jax.Array, cache: StreamCache, what: str):
        if cache.started:
            ref = cache.tensors["conv_in"]
            if (x.shape[0], *x.shape[2:4]) != (ref.shape[0], *ref.shape[2:4]):
                raise ValueError(
                    f"{what} chunk has batch/height/width {(x.shape[0], *x.shape[2:4])} but the "
                    f"stream started with {(ref.shape[0], *ref.shape[2:4])}")

    def _check_video(self, frames: jax.Array, cache: StreamCache):
        cfg = self.config
        if frames.ndim != 5 or frames.shape[-1] != cfg.in_channels:
            raise ValueError(f"video must be [B, T, H, W, {cfg.in_channels}], got shape "
                             f"{tuple(frames.shape)}")
        s, st = cfg.spatial_stride, cfg.temporal_stride
        h, w, t = frames.shape[2], frames.shape[3], frames.shape[1]
        if t < 1:
            raise ValueError("an encode chunk needs at least one frame")
        if h % s or w % s:
            raise ValueError(f"video height and width must be multiples of {s}, got {h}x{w}")
        if not cache.started and t % st != 1 % st:
            raise ValueError(f"the first encode chunk must have 1 + {st}*k frames (the first "
                             f"frame is encoded alone), got {t}")
        if cache.started and (t == 0 or t % st):
            raise ValueError(f"encode chunks after the first must have a positive multiple of "
                             f"{st} frames, got {t}")
        self._check_spatial(frames, cache, "encode")

    def _check_latents(self, latents: jax.Array, cache: StreamCache):
        z = self.config.z_dim
        if latents.ndim != 5 or latents.shape[-1] != z:
            raise ValueError(f"latents must be [B, T, h, w, {z}], got shape "
                             f"{tuple(latents.shape)}")
        if latents.shape[1] < 1:
            raise ValueError("decode_chunk needs at least one latent frame")
        self._check_spatial(latents, cache, "decode")
