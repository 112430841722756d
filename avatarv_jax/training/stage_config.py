"""Training configs of every stage: the model preset plus train/optimizer/checkpoint/data.

``configs/<stage>.py`` calls ``stage_config``. What each stage switches on in the DiT
(DESIGN §5):

  t2v          text -> video: no audio cross-attention, no motion stream.
  a2v          + audio cross-attention (zero-initialised output) and a one-frame reference.
  sft          + the motion stream, multi-frame cross-clip references, region-weighted loss,
               optional lip-sync / identity losses read by the AvatarWorld probe (``aux``).
  distill_cfg  + the guidance embedding: one pass learns the teacher's 3-pass guided velocity.
  distill_dmd  few-step generator by distribution matching (teacher = distill_cfg's student).
  grpo         Flow-GRPO on rewards, KL-tied to the frozen previous model.
  dpo          Diffusion-DPO on preference pairs (reward-ranked samples or a JSONL manifest).
  sr           the SR refiner (DESIGN §4): flow matching on high-res clips conditioned on their
               downscaled latents (training/sr_batch.py); data at inference.sr_scale x resolution.
  distill_sr   the SR refiner distilled to one step by DMD (posttrain/sr_stages.py).

Stages 4-5 train on SFT batches (``DATA_STAGE``) and keep the previous stage's DiT frozen as
``teacher`` (the teacher, the real score, or the reference model).
"""

from __future__ import annotations

import ml_collections

from avatarv_jax.config import get_model_config

STAGES = ("t2v", "a2v", "sft", "distill_cfg", "distill_dmd", "grpo", "dpo", "sr", "distill_sr")
POSTTRAIN_STAGES = ("distill_cfg", "distill_dmd", "grpo", "dpo")
PREVIOUS_STAGE = {"t2v": None, "a2v": "t2v", "sft": "a2v", "distill_cfg": "sft",
                  "distill_dmd": "distill_cfg", "grpo": "distill_dmd", "dpo": "distill_dmd",
                  "sr": "sft", "distill_sr": "sr"}
# The batch contract each stage reads (data/pipelines.py): stages 4-5 use SFT batches.
DATA_STAGE = {"t2v": "t2v", "a2v": "a2v", "sft": "sft", "distill_cfg": "sft",
              "distill_dmd": "sft", "grpo": "sft", "dpo": "sft", "sr": "sft", "distill_sr": "sft"}
# The SR refiner (DESIGN §4; posttrain/sr_stages.py): SFT batches at sr_scale x the resolution.
SR_STAGES = ("sr", "distill_sr")


def data_stage(stage: str) -> str:
    if stage not in DATA_STAGE:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    return DATA_STAGE[stage]

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
    cfg = get_model_config(model, "sr" if stage in SR_STAGES else "")
    cfg.stage = stage
    if stage == "t2v":
        cfg.model.audio_dim = 0
        cfg.model.motion_dim = 0
    elif stage == "a2v":
        cfg.model.motion_dim = 0
    if stage in POSTTRAIN_STAGES:
        cfg.model.guidance_embed = True
        _posttrain_sections(cfg, stage, model)

    cfg.train = ml_collections.ConfigDict(dict(
        seed=0,
        num_steps=scale["num_steps"],
        num_prefix_frames=1 if DATA_STAGE[stage] == "sft" else 0,   # clean continuation frames in GEN
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
    # Train the audio path as inference runs it: the frozen encoder sees each clip's audio with
    # the context inference gives a chunk (data/pipelines/config.py, training/batch.py).
    _set(cfg.data, audio_context_frames=int(cfg.inference.audio_context_frames))
    if stage in SR_STAGES:
        _sr_sections(cfg, stage, scale)
    if stage == "sft":
        # DESIGN §5's auxiliary losses on the DiT's clean-video estimate, read by the AvatarWorld
        # probe (training/aux_losses.py): AvatarWorld data only; weight 0 = off.
        cfg.aux = ml_collections.ConfigDict(dict(
            lip_sync_weight=0.0,   # (probe mouth opening of the estimate - of the decoded truth)^2
            identity_weight=0.0,   # 1 - cosine of probe identity embeddings, estimate vs reference
            max_sigma=0.5))        # only samples at this noise level or lower count
    # The previous stage's workdir (or step directory): parameter surgery initialises from it.
    cfg.init_from = ""
    cfg.init_from_ema = True
    # A VAE weights file from ``python -m avatarv_jax.training.vae_pretrain``: loaded into the
    # frozen VAE when the run starts (not on resume), after init_from.
    cfg.init_vae = ""
    return cfg


def _posttrain_sections(cfg: ml_collections.ConfigDict, stage: str, model: str) -> None:
    """The fields of stages 4-5 (docs/training.md explains each)."""
    tiny = model == "tiny"
    # Guidance scales the distilled student learns (drawn uniformly per sample). The few-step
    # generator, GRPO and DPO sample at ``sampling.text_scale`` / ``sampling.audio_scale``.
    cfg.distill = ml_collections.ConfigDict(dict(
        text_scale_range=(1.0, 6.0), audio_scale_range=(1.0, 6.0)))
    if stage != "distill_cfg":     # from here on the model is a few-step generator
        cfg.sampling.num_steps = 4
        cfg.sampling.shift = 1.0
    if stage == "distill_dmd":
        cfg.dmd = ml_collections.ConfigDict(dict(
            # The generator's steps and sigma shift are sampling.num_steps / sampling.shift,
            # so inference samples the distilled checkpoint as it was trained.
            fake_updates=2,               # fake-score updates per generator update
            fake_learning_rate=0.0,       # 0: the generator's learning rate
            backward_simulation=True,     # train on the generator's own intermediate states
        ))
    if stage == "grpo":
        cfg.grpo = ml_collections.ConfigDict(dict(
            group_size=4,                 # samples per condition
            sampling_steps=4 if tiny else 10,
            train_steps=2 if tiny else 5,  # random subset of sampling steps trained per update
            noise_level=0.7,              # SDE noise (0 = the ODE)
            clip_range=1e-4,              # on per-element log-ratios (Flow-GRPO)
            kl_weight=0.04,
            inner_updates=2,              # optimizer updates per batch of samples
            # Probe rewards (AvatarWorld): lip_sync, identity, motion_style; on real video
            # (posttrain.real_rewards): lse_c (needs mask_mouth/mask_face), face_similarity.
            # Weight 0 = not computed; every reward is listed so flags can switch it on.
            reward_weights=dict(lip_sync=1.0, identity=1.0, motion_style=0.5, lse_c=0.0,
                                face_similarity=0.0),
        ))
    if stage == "dpo":
        cfg.dpo = ml_collections.ConfigDict(dict(
            beta=500.0 if not tiny else 50.0,
            # "auto": reward-ranked samples of the reference; or a JSONL manifest of human
            # labels (posttrain.preference_data reads it; group_size, sampling_steps,
            # min_reward_margin and reward_weights then go unused)
            pairs="auto",
            group_size=4,                 # auto pairs: samples per condition
            sampling_steps=4,
            min_reward_margin=0.0,        # auto pairs closer than this are not used
            reward_weights=dict(lip_sync=1.0, identity=1.0, motion_style=0.5, lse_c=0.0,
                                face_similarity=0.0),
        ))


def _sr_sections(cfg: ml_collections.ConfigDict, stage: str, scale: dict) -> None:
    """The SR refiner's stages: data at ``inference.sr_scale`` x the base resolution; stage
    ``sr`` samples with ``sampling.num_steps``, ``distill_sr`` is a one-step generator."""
    cfg.data.resolution = int(scale["resolution"]) * int(cfg.inference.sr_scale)
    cfg.train.sample_every = 0          # sample videos are the base model's (training/samples.py)
    if stage == "distill_sr":
        cfg.sampling.num_steps = 1      # what inference.sr_steps must be for this checkpoint
        cfg.sampling.shift = 1.0
        cfg.dmd = ml_collections.ConfigDict(dict(
            fake_updates=2, fake_learning_rate=0.0,
            backward_simulation=False))   # one step: the generator always starts from noise
    cfg.inference.sr_steps = int(cfg.sampling.num_steps)
