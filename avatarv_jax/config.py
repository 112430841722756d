"""Model configurations as ml_collections ConfigDicts.

``configs/<name>.py`` files call ``get_model_config`` so that the same presets are importable
from the installed package (``avatarv_jax.config``) and selectable on the command line
(``--config configs/avatar_v_1_3b.py`` or ``configs/avatar_v_1_3b.py:sr``).
"""

from __future__ import annotations

import ml_collections

# Logical axis -> mesh axes. Parameters: 'embed' is sharded over fsdp (ZeRO-3 style), the
# head/MLP dimensions over tensor. Activations: batch over data and fsdp.
DEFAULT_LOGICAL_AXIS_RULES = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", "sequence"),
    ("activation_heads", "tensor"),
    ("activation_embed", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("conv_in", None),
    ("conv_out", "tensor"),
)

MOTION_DIM = 10  # per-video-frame motion vector: AvatarWorld's (data.avatarworld.motion.MOTION_DIM)

_DIT_PRESETS = {
    # Width, depth, heads and FFN of Wan 2.1 T2V 1.3B and 14B; the rest is Avatar V's.
    "avatar_v_1_3b": dict(dim=1536, num_layers=30, num_heads=12, ffn_dim=8960, text_dim=4096,
                          freq_dim=256, audio_dim=768, motion_dim=MOTION_DIM, dtype="bfloat16",
                          remat_policy="dots"),
    "avatar_v_14b": dict(dim=5120, num_layers=40, num_heads=40, ffn_dim=13824, text_dim=4096,
                         freq_dim=256, audio_dim=768, motion_dim=MOTION_DIM, dtype="bfloat16",
                         remat_policy="full"),
    # CPU tests: forward + backward in seconds.
    "tiny": dict(dim=64, num_layers=2, num_heads=4, ffn_dim=128, text_dim=32, freq_dim=32,
                 audio_dim=32, audio_context=1, motion_dim=MOTION_DIM, dtype="float32",
                 remat_policy="none"),
}

_ENCODERS = {
    "avatar_v_1_3b": dict(text_encoder="umt5_xxl", audio_encoder="base", vae="wan21"),
    "avatar_v_14b": dict(text_encoder="umt5_xxl", audio_encoder="base", vae="wan21"),
    "tiny": dict(text_encoder="tiny", audio_encoder="tiny", vae="tiny"),
}

# The SR refiner: the same DiT class on the high-resolution latent concatenated with the
# upsampled base latent, GEN attention limited to a temporal window.
_SR_OVERRIDES = dict(cond_channels=16, gen_window=2)


def dit_config(name: str, sr: bool = False) -> ml_collections.ConfigDict:
    if name not in _DIT_PRESETS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(_DIT_PRESETS)}")
    from avatarv_jax.models.dit import DiTConfig  # the dataclass holds the defaults

    values = {f: getattr(DiTConfig(), f) for f in DiTConfig.__dataclass_fields__}
    values.update(_DIT_PRESETS[name])
    if sr:
        values.update(_SR_OVERRIDES, cond_channels=values["in_channels"])
    values["patch_size"] = tuple(values["patch_size"])
    return ml_collections.ConfigDict(values)


def get_model_config(name: str, variant: str = "") -> ml_collections.ConfigDict:
    """The full configuration of one model: DiT, encoders, mesh, flow matching, sampling."""
    if variant not in ("", "sr"):
        raise ValueError(f"unknown variant {variant!r} of {name}; use '' or 'sr'")
    sr = variant == "sr"
    cfg = ml_collections.ConfigDict()
    cfg.name = name + ("_sr" if sr else "")
    cfg.model = dit_config(name, sr)
    cfg.update(_ENCODERS[name])
    cfg.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, sequence=1))
    cfg.logical_axis_rules = DEFAULT_LOGICAL_AXIS_RULES
    cfg.flow = ml_collections.ConfigDict(dict(
        logit_mean=0.0, logit_std=1.0,          # logit-normal training timesteps
        shift=0.0,                              # 0: resolution-dependent shift
        face_weight=0.5, mouth_weight=1.0, eye_weight=0.5,   # region loss weights
        motion_weight=1.0))
    cfg.dropout = ml_collections.ConfigDict(dict(p_text=0.1, p_audio=0.1, p_ref=0.05, p_all=0.05))
    cfg.sampling = ml_collections.ConfigDict(dict(
        num_steps=4 if name == "tiny" else 40, method="euler", shift=0.0,
        text_scale=5.0, audio_scale=4.0))
    # Chunked long-video inference (fields documented in avatarv_jax/inference/settings.py).
    cfg.inference = ml_collections.ConfigDict(dict(
        chunk_latents=6, prefix_latents=1, anchor_latents=1, ref_frames=17, min_ref_frames=5,
        audio_context_frames=50, max_text_length=256,
        resolution=(64, 64) if name == "tiny" else (480, 832), sr_scale=2, sr_steps=1,
        default_prompt="a person talking to the camera"))
    return cfg
