"""Training configs of stages 1-3: the model preset plus train/optimizer/checkpoint/data.

``configs/t2v.py``, ``configs/a2v.py`` and ``configs/sft.py`` call ``stage_config``. What each
stage switches on in the DiT (DESIGN §5):

  t2v  text -> video: no audio cross-attention, no motion stream.
  a2v  + audio cross-attention (zero-initialised output) and a one-frame reference.
  sft  + the motion stream, multi-frame cross-clip references, region-weighted loss.
"""

from __future__ import annotations

import ml_collections

from avatarv_jax.config import get_model_config

STAGES = ("t2v", "a2v", "sft")
PREVIOUS_STAGE = {"t2v": None, "a2v": "t2v", "sft": "a2v"}

# Per model: batch, frames, resolution, steps (the tiny preset runs on one CPU).
_SCALE = {
    "tiny": dict(batch_size=2, num_frames=5, ref_frames=5, resolution=32, num_steps=200,
                 learning_rate=1e-3, warmup_steps=20, text_max_length=32,
                 checkpoint_every=50, sample_every=0, log_every=10),
    "avatar_v_1_3b": dict(batch_size=32, num_frames=81, ref_frames=29, resolution=480,
                          num_steps=100_000, learning_rate=2e-4, warmup_steps=1000,
                          text_max_length=512, checkpoint_every=1000, sample_every=5000,
                          log_every=50),
    "avatar_v_14b": dict(batch_size=64, num_frames=81, ref_frames=29, resolution=720,
                         num_steps=100_000, learning_rate=1e-4, warmup_steps=2000,
                         text_max_length=512, checkpoint_every=500, sample_every=5000,
                         log_every=50),
}


def default_data_config() -> ml_collections.ConfigDict:
    """The data pipeline's defaults when ``avatarv_jax.data.pipelines`` exists, else the
    contract's fields."""
    try:
        from avatarv_jax.data.pipelines import default_data_config as pipeline_defaults
    except ImportError:
        return ml_collections.ConfigDict(dict(
            shards="", latent_shards="", batch_size=2, frames=5, ref_frames=5, resolution=32,
            text_length=32, tokenizer="", worker_count=0))
    return pipeline_defaults()


def _set(cfg: ml_collections.ConfigDict, **values):
    """Set the fields the section has (the pipeline's defaults may name fewer or more)."""
    with cfg.unlocked():
        for k, v in values.items():
            cfg[k] = v


def stage_config(stage: str, model: str) -> ml_collections.ConfigDict:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    if model not in _SCALE:
        raise ValueError(f"unknown model {model!r}; expected one of {sorted(_SCALE)}")
    scale = _SCALE[model]
    cfg = get_model_config(model)
    cfg.stage = stage
    if stage == "t2v":
        cfg.model.audio_dim = 0
        cfg.model.motion_dim = 0
    elif stage == "a2v":
        cfg.model.motion_dim = 0

    cfg.train = ml_collections.ConfigDict(dict(
        seed=0,
        num_steps=scale["num_steps"],
        num_prefix_frames=1 if stage == "sft" else 0,   # clean continuation frames in GEN
        log_every=scale["log_every"],
        max_bad_steps=5,          # NaN guard: stop after this many non-finite steps in a row
        sample_every=scale["sample_every"],   # 0: no sample videos
        sample_steps=4,
        progress_bar=True,        # on a terminal only
        peak_tflops_per_device=0.0,   # 0: look the device up (MFU is left out when unknown)
        distributed=False,        # jax.distributed.initialize() (multi-host)
        synthetic_data=False,     # random batches of the contract (benchmarks, smoke runs)
        synthetic_latents=False,  # ... as latents (skips the VAE) instead of pixels
    ))
    cfg.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=scale["learning_rate"], warmup_steps=scale["warmup_steps"],
        final_lr_ratio=0.1, clip_norm=1.0, weight_decay=0.01, adam_weight_decay=0.0,
        adam_b1=0.9, adam_b2=0.999, muon_beta=0.95, eps=1e-8,
        ema_decay=0.999 if model != "tiny" else 0.99))   # 0: no EMA
    cfg.checkpoint = ml_collections.ConfigDict(dict(
        every_steps=scale["checkpoint_every"], keep=3, async_save=True))
    cfg.data = default_data_config()
    _set(cfg.data, batch_size=scale["batch_size"], frames=scale["num_frames"],
         ref_frames=scale["ref_frames"], resolution=scale["resolution"],
         text_length=scale["text_max_length"])
    # The previous stage's workdir (or step directory): parameter surgery initialises from it.
    cfg.init_from = ""
    cfg.init_from_ema = True
    return cfg
