"""Sizes of the causal 3D video VAE (the Wan 2.1 layout) and its latent statistics."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

# Per-channel statistics of Wan 2.1 VAE latents (published with the model): the DiT sees
# (mu - mean) / std, which is roughly unit variance per channel.
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Sizes of a Wan-2.1-style causal video VAE; ``dtype`` is the compute dtype.

    The encoder has ``len(dim_mult)`` stages; every stage but the last halves height and
    width, and stage ``i`` also halves time when ``temporal_downsample[i]`` (the first frame
    always stays alone). The decoder mirrors it.
    """

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    in_channels: int = 3
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    dtype: Any = jnp.float32

    def __post_init__(self):
        object.__setattr__(self, "dim_mult", tuple(int(m) for m in self.dim_mult))
        object.__setattr__(self, "temporal_downsample",
                           tuple(bool(t) for t in self.temporal_downsample))
        object.__setattr__(self, "latents_mean", tuple(float(v) for v in self.latents_mean))
        object.__setattr__(self, "latents_std", tuple(float(v) for v in self.latents_std))
        for name in ("base_dim", "z_dim", "num_res_blocks", "in_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"VAEConfig.{name} must be a positive int, got {value!r}")
        if len(self.dim_mult) < 1 or min(self.dim_mult) < 1:
            raise ValueError(f"VAEConfig.dim_mult must be positive ints, got {self.dim_mult}")
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"VAEConfig.temporal_downsample needs one flag per downsampling stage "
                f"(len(dim_mult) - 1 = {len(self.dim_mult) - 1}), got {self.temporal_downsample}")
        # The decoder halves channels in every spatial upsampler (Wan 2.1 layout).
        for m in self.dim_mult[1:]:
            if (self.base_dim * m) % 2:
                raise ValueError(f"VAEConfig: base_dim * dim_mult must be even, got "
                                 f"{self.base_dim} * {m}")
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ValueError(f"VAEConfig.{name} has {len(getattr(self, name))} entries, "
                                 f"z_dim is {self.z_dim}")
        if min(self.latents_std) <= 0:
            raise ValueError(f"VAEConfig.latents_std must be positive, got {self.latents_std}")

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    def latent_frames(self, video_frames: int) -> int:
        """``1 + 4k`` video frames -> ``1 + k`` latent frames (for temporal stride 4)."""
        if video_frames < 1 or (video_frames - 1) % self.temporal_stride:
            raise ValueError(f"a video must have 1 + {self.temporal_stride}*k frames, got "
                             f"{video_frames}")
        return 1 + (video_frames - 1) // self.temporal_stride

    def video_frames(self, latent_frames: int) -> int:
        if latent_frames < 1:
            raise ValueError(f"need at least one latent frame, got {latent_frames}")
        return 1 + (latent_frames - 1) * self.temporal_stride

    @classmethod
    def wan21(cls, **overrides) -> VAEConfig:
        """The Wan 2.1 VAE (about 127M parameters), loadable with ``import_wan_vae``."""
        base = dict(base_dim=96, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
                    temporal_downsample=(False, True, True))
        return cls(**{**base, **overrides})

    @classmethod
    def tiny(cls, **overrides) -> VAEConfig:
        """Same strides and 16 latent channels, about 0.2M parameters: tests and CPU demos."""
        base = dict(base_dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                    temporal_downsample=(False, True, True),
                    latents_mean=(0.0,) * 16, latents_std=(1.0,) * 16)
        z_dim = overrides.get("z_dim", 16)
        if z_dim != 16:
            base.update(latents_mean=(0.0,) * z_dim, latents_std=(1.0,) * z_dim)
        return cls(**{**base, **overrides})

    @classmethod
    def tiny_s4(cls, **overrides) -> VAEConfig:
        """The tiny VAE with spatial stride 4 instead of 8 (temporal stride still 4).

        For small-resolution experiments (AvatarWorld at 64 px): a 16 x 16 latent grid keeps
        the mouth in cells of its own, where the stride-8 grid (8 x 8) blurs it into its
        neighbours. Same channels as ``tiny``, one spatial stage fewer.
        """
        base = dict(dim_mult=(1, 2, 2), temporal_downsample=(True, True))
        return cls.tiny(**{**base, **overrides})
