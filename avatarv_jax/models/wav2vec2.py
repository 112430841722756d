"""wav2vec 2.0 speech encoder (inference path): a 16 kHz waveform to 50 fps hidden states.

An alternative front end for the DiT's audio conditioning: ``Wav2Vec2Encoder`` turns a raw
waveform ``[B, N]`` into ``[B, T, hidden]`` with ``T ~= N / 320`` (one vector every 20 ms), and
``AudioEncoder.from_features(features, source_fps=50)`` (``models/audio_encoder.py``, built
with ``external_dim=hidden``) resamples those to the video frame rate and projects them to the
DiT's audio width. Weights come from transformers ``Wav2Vec2Model`` checkpoints
(``io/wav2vec2.py``).

Pipeline:

1. Feature extractor: ``len(conv_dim)`` 1-D convolutions without padding (kernels
   ``(10, 3, 3, 3, 3, 2, 2)``, strides ``(5, 2, 2, 2, 2, 2, 2)``: a total stride of 320 samples),
   each followed by exact GELU. ``feat_extract_norm='group'`` (base): a per-channel GroupNorm
   (one group per channel, statistics over time) after the first convolution only;
   ``'layer'`` (large): a LayerNorm over channels after every convolution.
2. Feature projection: LayerNorm over the last conv's channels, then a Linear to ``hidden``.
3. Positional embedding: a grouped convolution over time (kernel ``K``, ``G`` groups,
   ``K // 2`` zeros on both sides; for even ``K`` the last output is dropped so the length is
   kept), exact GELU, added to the projected features. The checkpoint stores it with weight
   normalisation over every axis but the kernel tap: ``w = g * v / ||v||``; the importer folds
   ``g`` and ``v`` into a plain kernel.
4. Transformer encoder, ``do_stable_layer_norm=False`` (base, post-LN): LayerNorm right after
   the positional embedding, then layers ``x = LN(x + attn(x)); x = LN'(x + ffn(x))``.
   ``do_stable_layer_norm=True`` (large, pre-LN): layers ``x = x + attn(LN(x));
   x = x + ffn(LN'(x))`` and the LayerNorm at the very end. Attention has biases and the usual
   ``1/sqrt(head_dim)`` scale; the FFN is Linear -> exact GELU -> Linear.

Masking, the quantizer and dropout are training-only and not implemented: the output equals
transformers' ``Wav2Vec2Model(...).last_hidden_state`` in eval mode for unpadded batches.
Layers are stacked (leading ``layers`` axis, ``nnx.vmap``) and run with ``jax.lax.scan``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from avatarv_jax.layers.initializers import make_param, normal, ones, zeros
from avatarv_jax.layers.linear import Dense
from avatarv_jax.layers.norms import LayerNorm

# PyTorch's nn.LayerNorm / nn.GroupNorm default, used by the feature extractor's norms.
CONV_NORM_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class Wav2Vec2Config:
    """Sizes of a wav2vec 2.0 encoder; field names follow transformers' ``Wav2Vec2Config``.

    ``dtype`` is the compute dtype (parameters stay fp32; norms run in fp32).
    """

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    conv_dim: tuple[int, ...] = (512,) * 7
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = False
    feat_extract_norm: str = "group"
    do_stable_layer_norm: bool = False
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    layer_norm_eps: float = 1e-5
    sample_rate: int = 16000
    dtype: Any = jnp.float32
    remat: bool = False

    def __post_init__(self):
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "num_conv_pos_embeddings",
                     "num_conv_pos_embedding_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Wav2Vec2Config.{name} must be a positive int, got {value!r}")
        for name in ("conv_dim", "conv_kernel", "conv_stride"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        if not (len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride) >= 1):
            raise ValueError(f"conv_dim, conv_kernel and conv_stride must have the same, non-zero "
                             f"length, got {len(self.conv_dim)}, {len(self.conv_kernel)}, "
                             f"{len(self.conv_stride)}")
        if min(self.conv_dim + self.conv_kernel + self.conv_stride) < 1:
            raise ValueError("conv_dim, conv_kernel and conv_stride must be positive")
        if self.feat_extract_norm not in ("group", "layer"):
            raise ValueError(f"feat_extract_norm must be 'group' or 'layer', got "
                             f"{self.feat_extract_norm!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_size % self.num_conv_pos_embedding_groups:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_conv_pos_embedding_groups {self.num_conv_pos_embedding_groups}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def total_stride(self) -> int:
        """Samples per output frame (320 for the released models)."""
        out = 1
        for s in self.conv_stride:
            out *= s
        return out

    @property
    def fps(self) -> float:
        """Output frames per second (50 at 16 kHz for the released models)."""
        return self.sample_rate / self.total_stride

    def num_frames(self, num_samples: int) -> int:
        """Output frames for ``num_samples`` input samples (convolutions are unpadded)."""
        n = num_samples
        for k, s in zip(self.conv_kernel, self.conv_stride):
            n = (n - k) // s + 1 if n >= k else 0
        return n

    @classmethod
    def base(cls, **overrides) -> Wav2Vec2Config:
        """``facebook/wav2vec2-base(-960h)`` layout: group-norm extractor, post-LN encoder."""
        return cls(**overrides)

    @classmethod
    def large(cls, **overrides) -> Wav2Vec2Config:
        """``facebook/wav2vec2-large-lv60`` / XLSR layout: layer-norm extractor, pre-LN encoder.

        The released large checkpoints also set ``conv_bias=True``; ``config.json`` says so.
        """
        kw = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
              "intermediate_size": 4096, "feat_extract_norm": "layer",
              "do_stable_layer_norm": True, "conv_bias": True}
        return cls(**{**kw, **overrides})

    @classmethod
    def tiny(cls, **overrides) -> Wav2Vec2Config:
        """A toy for tests and CPU demos (total stride 20)."""
        kw = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 64, "conv_dim": (16, 16, 16), "conv_kernel": (10, 3, 3),
              "conv_stride": (5, 2, 2), "num_conv_pos_embeddings": 16,
              "num_conv_pos_embedding_groups": 4}
        return cls(**{**kw, **overrides})


def _conv1d(x: jnp.ndarray, kernel: jnp.ndarray, *, stride: int = 1,
            padding: tuple[int, int] = (0, 0), groups: int = 1) -> jnp.ndarray:
    """Channels-last 1-D convolution: ``x [B, T, in]``, ``kernel [width, in / groups, out]``."""
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(stride,), padding=[padding],
        dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=groups)


class ChannelGroupNorm(nnx.Module):
    """GroupNorm with one group per channel over ``[B, T, C]``: statistics over time, in fp32."""

    def __init__(self, channels: int, *, eps: float = CONV_NORM_EPS, rngs: nnx.Rngs | None):
        self.eps = eps
        self.scale = make_param(rngs, ones, (channels,), ("conv_out",))
        self.bias = make_param(rngs, zeros, (channels,), ("conv_out",))

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class FeatureConv(nnx.Module):
    """One extractor stage: unpadded strided conv, optional norm, exact GELU.

    ``conv.kernel`` is ``[width, in, out]`` (PyTorch ``[out, in, width]`` transposed
    ``(2, 1, 0)``); ``norm`` is ``None``, a ``ChannelGroupNorm`` or a channel ``LayerNorm``.
    """

    def __init__(self, cfg: Wav2Vec2Config, index: int, *, rngs: nnx.Rngs):
        c_in = 1 if index == 0 else cfg.conv_dim[index - 1]
        c_out, width = cfg.conv_dim[index], cfg.conv_kernel[index]
        self.stride = cfg.conv_stride[index]
        self.dtype = cfg.dtype
        self.kernel = make_param(rngs, nnx.initializers.he_normal(in_axis=(0, 1), out_axis=2),
                                 (width, c_in, c_out), (None, "conv_in", "conv_out"))
        self.bias = (make_param(rngs, zeros, (c_out,), ("conv_out",)) if cfg.conv_bias
                     else None)
        if cfg.feat_extract_norm == "layer":
            self.norm = LayerNorm(c_out, eps=CONV_NORM_EPS, axis_name="conv_out", rngs=rngs)
        elif index == 0:
            self.norm = ChannelGroupNorm(c_out, rngs=rngs)
        else:
            self.norm = None

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        y = _conv1d(x.astype(self.dtype), self.kernel[...].astype(self.dtype), stride=self.stride)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.norm is not None:
            y = self.norm(y)
        return jax.nn.gelu(y, approximate=False)


class PositionalConv(nnx.Module):
    """Grouped "same" convolution over time + exact GELU: the relative position embedding.

    ``kernel`` is ``[K, hidden / G, hidden]``: the weight-normalised PyTorch weight
    ``[hidden, hidden / G, K]`` after folding ``g * v / ||v||`` and transposing ``(2, 1, 0)``.
    """

    def __init__(self, cfg: Wav2Vec2Config, *, rngs: nnx.Rngs):
        k, g, h = cfg.num_conv_pos_embeddings, cfg.num_conv_pos_embedding_groups, cfg.hidden_size
        self.groups = g
        self.width = k
        self.dtype = cfg.dtype
        self.kernel = make_param(rngs, normal((2.0 / (k * h)) ** 0.5), (k, h // g, h),
                                 (None, None, "embed"))
        self.bias = make_param(rngs, zeros, (h,), ("embed",))

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        # PyTorch pads K // 2 on both sides and, for even K, drops the last output; padding one
        # fewer on the right gives the same outputs directly.
        left = self.width // 2
        right = left - (1 - self.width % 2)
        y = _conv1d(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                    padding=(left, right), groups=self.groups)
        return jax.nn.gelu(y + self.bias[...].astype(self.dtype), approximate=False)


class FeatureProjection(nnx.Module):
    """LayerNorm over the extractor's channels, then Linear to ``hidden``."""

    def __init__(self, cfg: Wav2Vec2Config, *, rngs: nnx.Rngs):
        c = cfg.conv_dim[-1]
        self.layer_norm = LayerNorm(c, eps=cfg.layer_norm_eps, axis_name="conv_out", rngs=rngs)
        self.projection = Dense(c, cfg.hidden_size, axes=("conv_out", "embed"), dtype=cfg.dtype,
                                rngs=rngs)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return self.projection(self.layer_norm(x))


class Wav2Vec2Attention(nnx.Module):
    """Bidirectional multi-head self-attention with biased q/k/v/out projections."""

    def __init__(self, cfg: Wav2Vec2Config, *, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.q_proj = Dense(h, h, axes=("embed", "heads"), dtype=cfg.dtype, rngs=rngs)
        self.k_proj = Dense(h, h, axes=("embed", "heads"), dtype=cfg.dtype, rngs=rngs)
        self.v_proj = Dense(h, h, axes=("embed", "heads"), dtype=cfg.dtype, rngs=rngs)
        self.out_proj = Dense(h, h, axes=("heads", "embed"), dtype=cfg.dtype, rngs=rngs)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        b, t, _ = x.shape
        split = lambda y: y.reshape(b, t, self.num_heads, self.head_dim)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * self.head_dim ** -0.5
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, self.num_heads * self.head_dim)
        return self.out_proj(out)


class Wav2Vec2Layer(nnx.Module):
    """One encoder layer; ``stable`` selects pre-LN (large) over post-LN (base)."""

    def __init__(self, cfg: Wav2Vec2Config, *, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.stable = cfg.do_stable_layer_norm
        self.attention = Wav2Vec2Attention(cfg, rngs=rngs)
        self.layer_norm = LayerNorm(h, eps=cfg.layer_norm_eps, rngs=rngs)
        self.intermediate_dense = Dense(h, cfg.intermediate_size, axes=("embed", "mlp"),
                                        dtype=cfg.dtype, rngs=rngs)
        self.output_dense = Dense(cfg.intermediate_size, h, axes=("mlp", "embed"),
                                  dtype=cfg.dtype, rngs=rngs)
        self.final_layer_norm = LayerNorm(h, eps=cfg.layer_norm_eps, rngs=rngs)

    def feed_forward(self, x: jnp.ndarray) -> jnp.ndarray:
        return self.output_dense(jax.nn.gelu(self.intermediate_dense(x), approximate=False))

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.stable:
            x = x + self.attention(self.layer_norm(x))
            return x + self.feed_forward(self.final_layer_norm(x))
        x = self.layer_norm(x + self.attention(x))
        return self.final_layer_norm(x + self.feed_forward(x))


class Wav2Vec2Encoder(nnx.Module):
    """Waveform ``[B, N]`` at 16 kHz to hidden states ``[B, cfg.num_frames(N), hidden]``.

    Parameters (``{i}`` stacked on the leading ``layers`` axis of ``layers``)::

        feature_extractor.{j}.kernel / .bias / .norm.{scale,bias}   conv stages
        feature_projection.layer_norm, feature_projection.projection
        pos_conv.kernel / .bias       grouped positional conv (weight norm folded in)
        encoder_norm                  after the positional embedding (post-LN) or at the end
        layers.{attention.{q,k,v,out}_proj, layer_norm, intermediate_dense, output_dense,
                final_layer_norm}
    """

    def __init__(self, cfg: Wav2Vec2Config, rngs: nnx.Rngs):
        self.cfg = cfg
        self.feature_extractor = nnx.List([FeatureConv(cfg, j, rngs=rngs)
                                           for j in range(len(cfg.conv_dim))])
        self.feature_projection = FeatureProjection(cfg, rngs=rngs)
        self.pos_conv = PositionalConv(cfg, rngs=rngs)
        self.encoder_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(r):
            return Wav2Vec2Layer(cfg, rngs=r)

        self.layers = make_layers(rngs)

    def extract_features(self, wave: jnp.ndarray) -> jnp.ndarray:
        """The convolutional feature extractor: ``[B, N]`` -> ``[B, T, conv_dim[-1]]``."""
        if wave.ndim != 2:
            raise ValueError(f"wave must be [batch, samples], got shape {tuple(wave.shape)}")
        if self.cfg.num_frames(wave.shape[1]) < 1:
            raise ValueError(f"{wave.shape[1]} samples are too few for one output frame "
                             f"(the first convolution alone needs {self.cfg.conv_kernel[0]})")
        x = wave[..., None]
        for conv in self.feature_extractor:
            x = conv(x)
        return x

    def __call__(self, wave: jnp.ndarray) -> jnp.ndarray:
        """``wave [B, N]`` to ``[B, T, hidden]`` at ``cfg.fps`` (50 at 16 kHz): frame ``t``
        covers samples ``[320 t, 320 t + 400)`` for the released models."""
        cfg = self.cfg
        x = self.feature_projection(self.extract_features(wave))
        x = x + self.pos_conv(x)
        if not cfg.do_stable_layer_norm:
            x = self.encoder_norm(x)

        graphdef, state = nnx.split(self.layers)

        def step(h, layer_state):
            return nnx.merge(graphdef, layer_state)(h), None

        if cfg.remat:
            step = jax.checkpoint(step)
        x, _ = jax.lax.scan(step, x, state)
        if cfg.do_stable_layer_norm:
            x = self.encoder_norm(x)
        return x
