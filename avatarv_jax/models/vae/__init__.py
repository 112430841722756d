"""Causal 3D video VAE with the Wan 2.1 layout, whole-video and streaming."""

from avatarv_jax.models.vae.config import VAEConfig
from avatarv_jax.models.vae.model import CausalVideoVAE, StreamCache
from avatarv_jax.models.vae.streaming import VAEStreamer

__all__ = ["CausalVideoVAE", "StreamCache", "VAEConfig", "VAEStreamer"]
