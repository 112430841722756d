"""Build every model of a configuration (DiT, text encoder, audio encoder, VAE) by name."""

from __future__ import annotations

from flax import nnx

from avatarv_jax.models.audio_encoder import AudioEncoder, AudioEncoderConfig
from avatarv_jax.models.dit import DiT, DiTConfig
from avatarv_jax.models.text_encoder import T5Encoder, TextEncoderConfig
from avatarv_jax.models.vae import CausalVideoVAE, VAEConfig


def _preset(cls, name: str, kind: str):
    factory = getattr(cls, name, None)
    if factory is None or name.startswith("_"):
        raise ValueError(f"unknown {kind} preset {name!r}")
    return factory()


def dit_config(cfg) -> DiTConfig:
    return DiTConfig.from_config(cfg.model)


def text_encoder_config(cfg) -> TextEncoderConfig:
    return _preset(TextEncoderConfig, cfg.text_encoder, "text encoder")


def audio_encoder_config(cfg) -> AudioEncoderConfig:
    return _preset(AudioEncoderConfig, cfg.audio_encoder, "audio encoder")


def vae_config(cfg) -> VAEConfig:
    return _preset(VAEConfig, cfg.vae, "VAE")


def check_compatible(cfg) -> None:
    """The encoders' output widths must be the DiT's input widths."""
    dit, text = dit_config(cfg), text_encoder_config(cfg)
    audio, vae = audio_encoder_config(cfg), vae_config(cfg)
    problems = []
    if text.d_model != dit.text_dim:
        problems.append(f"text encoder width {text.d_model} != DiT text_dim {dit.text_dim}")
    if dit.audio_dim and audio.out_dim != dit.audio_dim:
        problems.append(f"audio encoder out_dim {audio.out_dim} != DiT audio_dim {dit.audio_dim}")
    if vae.z_dim != dit.in_channels:
        problems.append(f"VAE z_dim {vae.z_dim} != DiT in_channels {dit.in_channels}")
    if problems:
        raise ValueError(f"config {cfg.name}: " + "; ".join(problems))


def build_models(cfg, *, seed: int = 0) -> dict[str, nnx.Module]:
    """Freshly initialised DiT, text encoder, audio encoder and VAE of ``cfg``."""
    check_compatible(cfg)
    dit_cfg, text_cfg = dit_config(cfg), text_encoder_config(cfg)
    audio_cfg, vae_cfg = audio_encoder_config(cfg), vae_config(cfg)

    # Initialising under one jit compiles a single program instead of one per parameter.
    @nnx.jit
    def create():
        rngs = nnx.Rngs(seed)
        return {
            "dit": DiT(dit_cfg, rngs=rngs),
            "text_encoder": T5Encoder(text_cfg, rngs),
            "audio_encoder": AudioEncoder(audio_cfg, rngs),
            "vae": CausalVideoVAE(vae_cfg, rngs=rngs),
        }

    return create()
