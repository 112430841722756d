"""Audio encoder: a 16 kHz waveform to one feature vector per video frame (25 fps).

The DiT's audio cross-attention lets each latent frame attend to the audio tokens of its own
window of video frames, so audio features must be aligned with video frames: output frame ``f``
summarises the audio around time ``f / fps``.

Pipeline (``AudioEncoder.__call__``):

1. Whisper-style log-mel spectrogram (``layers/mel.py``): 100 frames/s, frame ``k`` centred at
   ``k / 100`` s.
2. Two 1-D convolutions (kernel 3, stride 2, GELU), each padded by one frame on both sides, so
   output ``i`` is centred on input ``2 i``: after both, frame ``i`` is centred on mel frame
   ``4 i``, i.e. time ``i / 25`` s, exactly video frame ``i``. If ``fps`` differs from that rate
   (``sample_rate / hop / 4``), the sequence is resampled linearly to ``fps``.
3. The sequence is cut to ``ceil(N / (sample_rate / fps))`` frames, the video frames the audio
   covers (the convolutions give ``N // 640 + 1`` at 16 kHz, never fewer).
4. A pre-LN transformer with rotary position embeddings (RoPE) on queries and keys. RoPE rather
   than absolute sinusoids: attention then depends only on the distance between frames, so a
   sound gives the same features wherever it sits in the clip, which matters because inference
   encodes audio chunk by chunk. The layers are stacked (``nnx.vmap``) and run with
   ``jax.lax.scan``.
5. A final LayerNorm and a dense head to ``out_dim``.

Attention is global over the clip (memory grows with the square of its length): encode long
audio in windows of a few tens of seconds, as inference does chunk by chunk.

``from_features`` takes features from an external speech encoder instead (wav2vec2-class models
give 768/1024 wide vectors at 50 fps), resamples them linearly to ``fps`` and projects them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avatarv_jax.layers.initializers import make_param, zeros
from avatarv_jax.layers.linear import Dense
from avatarv_jax.layers.mel import log_mel_spectrogram
from avatarv_jax.layers.norms import LayerNorm


@dataclasses.dataclass(frozen=True)
class AudioEncoderConfig:
    """Sizes of the audio encoder; ``external_dim`` enables ``from_features``."""

    sample_rate: int = 16000
    n_mels: int = 80
    n_fft: int = 400
    hop: int = 160
    width: int = 512
    num_layers: int = 6
    num_heads: int = 8
    mlp_dim: int = 2048
    out_dim: int = 768
    fps: float = 25.0
    external_dim: int | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    remat: bool = False
    dtype: Any = jnp.bfloat16

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if (self.width // self.num_heads) % 2:
            raise ValueError(f"head dim {self.width // self.num_heads} must be even for RoPE")
        if self.fps <= 0 or self.sample_rate <= 0 or self.hop <= 0:
            raise ValueError(f"fps, sample_rate and hop must be positive, got fps={self.fps}, "
                             f"sample_rate={self.sample_rate}, hop={self.hop}")
        if self.external_dim is not None and self.external_dim < 1:
            raise ValueError(f"external_dim must be positive or None, got {self.external_dim}")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def conv_fps(self) -> float:
        """Frame rate after the two stride-2 convolutions (25 at 16 kHz with hop 160)."""
        return self.sample_rate / self.hop / 4.0

    @classmethod
    def tiny(cls, **overrides) -> "AudioEncoderConfig":
        """A few-thousand-parameter encoder for tests and CPU demos."""
        kw = dict(width=32, num_layers=2, num_heads=4, mlp_dim=64, out_dim=32, dtype=jnp.float32)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def base(cls, **overrides) -> "AudioEncoderConfig":
        """The default model size (about Whisper-base's encoder)."""
        kw = dict(width=512, num_layers=6, num_heads=8, mlp_dim=2048, out_dim=768)
        kw.update(overrides)
        return cls(**kw)


def num_video_frames(num_samples: int, sample_rate: int = 16000, fps: float = 25.0) -> int:
    """Video frames that ``num_samples`` of audio cover: ``ceil(num_samples * fps / sample_rate)``.

    A partly covered last frame counts (1.01 s at 25 fps is 26 frames). Products within 1e-6 of
    an integer count as that integer, so float frame rates do not add a frame by rounding.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    return _ceil_tolerant(num_samples * fps / sample_rate)


def _ceil_tolerant(x: float) -> int:
    nearest = round(x)
    return int(nearest) if abs(x - nearest) < 1e-6 else int(math.ceil(x))


def resample_frames(x: jnp.ndarray, source_fps: float, target_fps: float,
                    num_frames: int) -> jnp.ndarray:
    """Linear interpolation in time of ``x [B, T, D]`` from ``source_fps`` to ``target_fps``.

    Source frame ``t`` stands for time ``t / source_fps`` and output frame ``f`` for time
    ``f / target_fps``; times past the last source frame take its value (as ``np.interp``
    does). The indices and weights are computed in numpy, so the result is a static gather.
    """
    if x.ndim != 3:
        raise ValueError(f"expected [batch, time, dim], got shape {tuple(x.shape)}")
    if source_fps <= 0 or target_fps <= 0:
        raise ValueError(f"frame rates must be positive, got source_fps={source_fps}, "
                         f"target_fps={target_fps}")
    length = x.shape[1]
    if length < 1:
        raise ValueError("cannot resample an empty sequence")
    pos = np.clip(np.arange(num_frames) * (source_fps / target_fps), 0.0, length - 1)
    lo = np.floor(pos).astype(np.int32)
    hi = np.minimum(lo + 1, length - 1)
    w = jnp.asarray((pos - lo)[None, :, None], x.dtype)
    return x[:, lo] * (1 - w) + x[:, hi] * w


class Conv1d(nnx.Module):
    """Channels-last 1-D convolution with explicit symmetric padding.

    ``kernel`` is ``[width, in, out]``; PyTorch ``Conv1d`` weights ``[out, in, width]`` are
    transposed ``(2, 1, 0)`` on import.
    """

    def __init__(self, in_features: int, out_features: int, *, kernel_size: int = 3,
                 stride: int = 1, padding: int = 1, dtype=jnp.float32, rngs: nnx.Rngs):
        self.stride = stride
        self.padding = padding
        self.dtype = dtype
        self.kernel = make_param(rngs, nnx.initializers.lecun_normal(),
                                 (kernel_size, in_features, out_features),
                                 (None, "conv_in", "conv_out"))
        self.bias = make_param(rngs, zeros, (out_features,), ("conv_out",))

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype),
            window_strides=(self.stride,), padding=[(self.padding, self.padding)],
            dimension_numbers=("NWC", "WIO", "NWC"))
        return y + self.bias[...].astype(self.dtype)


def apply_rope(x: jnp.ndarray, base: float) -> jnp.ndarray:
    """Rotary embedding over ``x [B, T, H, D]`` at positions ``0..T-1`` (half-split pairs).

    Pair ``(x[i], x[i + D/2])`` turns by angle ``t * base^(-2i/D)``; computed in fp32.
    """
    length, dim = x.shape[1], x.shape[-1]
    inv_freq = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    angles = np.arange(length, dtype=np.float64)[:, None] * inv_freq[None, :]
    cos = jnp.asarray(np.cos(angles), jnp.float32)[None, :, None, :]
    sin = jnp.asarray(np.sin(angles), jnp.float32)[None, :, None, :]
    xf = x.astype(jnp.float32)
    a, b = xf[..., : dim // 2], xf[..., dim // 2:]
    out = jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
    return out.astype(x.dtype)


class SelfAttention(nnx.Module):
    """Bidirectional multi-head self-attention with RoPE on queries and keys."""

    def __init__(self, cfg: AudioEncoderConfig, *, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
        out_init = nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
        shape, axes = (cfg.width, cfg.num_heads, cfg.head_dim), ("embed", "heads", "kv")
        self.query = make_param(rngs, init, shape, axes)
        self.key = make_param(rngs, init, shape, axes)
        self.value = make_param(rngs, init, shape, axes)
        self.out = make_param(rngs, out_init, (cfg.num_heads, cfg.head_dim, cfg.width),
                              ("heads", "kv", "embed"))
        self.rope_base = cfg.rope_base
        self.dtype = cfg.dtype

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = x.astype(self.dtype)
        q, k, v = (jnp.einsum("btd,dhk->bthk", x, p[...].astype(self.dtype))
                   for p in (self.query, self.key, self.value))
        q, k = apply_rope(q, self.rope_base), apply_rope(k, self.rope_base)
        y = jax.nn.dot_product_attention(q, k, v)
        return jnp.einsum("bthk,hkd->btd", y, self.out[...].astype(self.dtype))


class EncoderBlock(nnx.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, cfg: AudioEncoderConfig, *, rngs: nnx.Rngs):
        self.attn_norm = LayerNorm(cfg.width, eps=cfg.norm_eps, rngs=rngs)
        self.attn = SelfAttention(cfg, rngs=rngs)
        self.mlp_norm = LayerNorm(cfg.width, eps=cfg.norm_eps, rngs=rngs)
        self.mlp_in = Dense(cfg.width, cfg.mlp_dim, axes=("embed", "mlp"), dtype=cfg.dtype,
                            rngs=rngs)
        self.mlp_out = Dense(cfg.mlp_dim, cfg.width, axes=("mlp", "embed"), dtype=cfg.dtype,
                             rngs=rngs)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))


class AudioEncoder(nnx.Module):
    """Waveform ``[B, N]`` to frame-aligned audio tokens ``[B, F, out_dim]``."""

    def __init__(self, cfg: AudioEncoderConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.conv1 = Conv1d(cfg.n_mels, cfg.width, stride=2, dtype=cfg.dtype, rngs=rngs)
        self.conv2 = Conv1d(cfg.width, cfg.width, stride=2, dtype=cfg.dtype, rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return EncoderBlock(cfg, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = LayerNorm(cfg.width, eps=cfg.norm_eps, rngs=rngs)
        self.head = Dense(cfg.width, cfg.out_dim, axes=("embed", None), dtype=cfg.dtype,
                          rngs=rngs)
        if cfg.external_dim is not None:
            self.external_norm = LayerNorm(cfg.external_dim, eps=cfg.norm_eps, axis_name=None,
                                           rngs=rngs)
            self.external_proj = Dense(cfg.external_dim, cfg.out_dim, axes=(None, None),
                                       dtype=cfg.dtype, rngs=rngs)
        else:
            self.external_norm = None
            self.external_proj = None

    def frame_embeddings(self, wave: jnp.ndarray) -> jnp.ndarray:
        """Log-mel and convolutions, cut or resampled to the video frames: ``[B, F, width]``."""
        cfg = self.cfg
        if wave.ndim != 2:
            raise ValueError(f"wave must be [batch, samples], got shape {tuple(wave.shape)}")
        num_frames = num_video_frames(wave.shape[1], cfg.sample_rate, cfg.fps)
        mel = log_mel_spectrogram(wave, sample_rate=cfg.sample_rate, n_fft=cfg.n_fft,
                                  hop=cfg.hop, n_mels=cfg.n_mels)
        x = jax.nn.gelu(self.conv1(mel.astype(cfg.dtype)))
        x = jax.nn.gelu(self.conv2(x))
        if math.isclose(cfg.conv_fps, cfg.fps):
            return x[:, :num_frames]  # conv frame i is video frame i; the surplus is at the end
        return resample_frames(x, cfg.conv_fps, cfg.fps, num_frames)

    def encode_frames(self, x: jnp.ndarray) -> jnp.ndarray:
        """The transformer stack, final norm and head over ``[B, F, width]`` embeddings."""
        graphdef, state = nnx.split(self.blocks)

        def step(h, layer_state):
            return nnx.merge(graphdef, layer_state)(h), None

        if self.cfg.remat:
            step = jax.checkpoint(step)
        x, _ = jax.lax.scan(step, x, state)
        return self.head(self.final_norm(x))

    def __call__(self, wave: jnp.ndarray) -> jnp.ndarray:
        """``wave [B, N]`` at ``cfg.sample_rate`` to ``[B, num_video_frames(N), out_dim]``."""
        return self.encode_frames(self.frame_embeddings(wave))

    def from_features(self, features: jnp.ndarray, source_fps: float,
                      num_frames: int | None = None) -> jnp.ndarray:
        """External encoder features ``[B, T, external_dim]`` to ``[B, F, out_dim]``.

        Source frame ``t`` is taken to describe time ``t / source_fps``. ``num_frames``
        defaults to the video frames the features span, ``ceil(T * fps / source_fps)``.
        """
        cfg = self.cfg
        if self.external_proj is None:
            raise ValueError("from_features needs AudioEncoderConfig.external_dim; this encoder "
                             "was built with external_dim=None")
        if features.ndim != 3:
            raise ValueError(f"features must be [batch, time, dim], got shape "
                             f"{tuple(features.shape)}")
        if features.shape[-1] != cfg.external_dim:
            raise ValueError(f"features are {features.shape[-1]} wide but the encoder was "
                             f"configured with external_dim={cfg.external_dim}")
        if num_frames is None:
            num_frames = _ceil_tolerant(features.shape[1] * cfg.fps / source_fps)
        x = resample_frames(features.astype(jnp.float32), source_fps, cfg.fps, num_frames)
        return self.external_proj(self.external_norm(x))
