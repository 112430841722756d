"""The train step of stage ``sr``: the SR refiner (DESIGN §4) with the flow-matching loss.

The base model's step (``training.step``) with the SR batch (``training.sr_batch``): high-
resolution target latents, the upsampled base-resolution latents as the channel-concatenated
condition, a high-resolution reference with its audio, text and audio as in SFT. The loss is
stage 3's (region-weighted velocity loss, condition dropout, clean prefix frames).
"""

from __future__ import annotations

from typing import Mapping

import jax

from avatarv_jax.diffusion.objective import flow_matching_loss
from avatarv_jax.models import factory
from avatarv_jax.training.sr_batch import check_sr_batch, encode_sr_batch
from avatarv_jax.training.step import TrainStepBuilder


def sr_scale_of(cfg) -> int:
    """The upscale factor the refiner trains for; also checks what the SR stages cannot do."""
    scale = int(cfg.inference.sr_scale)
    if scale < 1:
        raise ValueError(f"inference.sr_scale must be >= 1, got {scale}")
    if int(cfg.train.sample_every):
        raise ValueError(f"stage {cfg.stage}: train.sample_every must be 0 (sample videos are "
                         "written for the base model only)")
    return scale


class SRFlowStep(TrainStepBuilder):
    """stage sr: flow matching of the SR refiner on (high-res clip, downscaled clip) pairs."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if not factory.dit_config(self.cfg).cond_channels:
            raise ValueError(f"stage {self.stage} trains the SR refiner: the config's DiT needs "
                             "cond_channels > 0 (get_model_config(name, 'sr'))")
        self.sr_scale = sr_scale_of(self.cfg)
        self.spatial_stride = factory.vae_config(self.cfg).spatial_stride

    def sr_batch(self, frozen_params, batch):
        frozen = {k: self.frozen[k].merge(v) for k, v in frozen_params.items()
                  if k != "teacher"}
        return encode_sr_batch(frozen, batch, self.sr_scale)

    def loss_and_grads(self, params, frozen_params, batch, key):
        train_batch = self.sr_batch(frozen_params, batch)

        def loss_fn(p):
            return flow_matching_loss(self.dit.merge(p), train_batch, key, flow_cfg=self.cfg.flow,
                                      dropout=self.dropout, num_prefix=self.num_prefix)

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    def compile(self, state, batch_example: Mapping):
        check_sr_batch(batch_example, self.sr_scale, self.spatial_stride)
        return super().compile(state, batch_example)
