"""distill_sr: the SR refiner distilled to one step by DMD (DESIGN §4), on the trainer's
machinery (sharding, donation, NaN guard, EMA, Orbax checkpoints, exact resume).

The frozen ``teacher`` is the ``sr`` stage's refiner (the real score); the fake score lives in
``TrainState.aux``; the trained generator is ``TrainState.params`` (what inference loads with
``inference.sr_steps = sampling.num_steps``, 1 by default). The algorithm is
``posttrain.dmd``'s, as in ``distill_dmd``; this module only says how the SR refiner and its
batch plug in: the condition is the upsampled base-resolution latents (``training.sr_batch``),
the velocity is the refiner's single conditional pass (inference runs the refiner unguided),
and there is no motion stream.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from avatarv_jax.diffusion.flow import sigma_to_timestep
from avatarv_jax.models.dit import DiT, GenInputs, RefInputs
from avatarv_jax.posttrain.stages import Conditions, DMDStep, split_conditions
from avatarv_jax.training.sr_batch import check_sr_batch, encode_sr_batch
from avatarv_jax.training.sr_step import SRFlowStep, sr_scale_of
from avatarv_jax.training.step import ModuleTemplate


def teacher_template(cfg) -> ModuleTemplate:
    """The frozen ``sr`` refiner: the student's own config."""
    from avatarv_jax.models import factory
    dit_cfg = factory.dit_config(cfg)
    return ModuleTemplate(nnx.eval_shape(lambda: DiT(dit_cfg, rngs=nnx.Rngs(0))))


def sr_velocity_fn(template: ModuleTemplate, params, cond: Conditions) -> Callable:
    """``v(x, sigma)`` of the SR refiner for the noisy frames ``x`` behind the clean prefix,
    every condition on (text, audio, reference, upsampled base latents); sigma scalar or [B]."""
    dit = template.merge(params)
    tb = cond.batch
    b = cond.size
    p = cond.prefix["video"].shape[1]
    ref = RefInputs(latents=tb.ref_latents, audio=tb.ref_audio,
                    valid_frames=jnp.full((b,), tb.ref_latents.shape[1], jnp.int32))
    audio_mask = jnp.ones((b,), jnp.float32)

    def v(x, sigma):
        video = jnp.concatenate([cond.prefix["video"], x["video"]], axis=1)
        f = video.shape[1]
        sig = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1, 1), (b, 1))
        frame_sigma = jnp.where(jnp.arange(f)[None] < p, 0.0, sig)
        gen = GenInputs(latents=video, timesteps=sigma_to_timestep(frame_sigma), text=tb.text,
                        audio=tb.audio, audio_mask=audio_mask, cond_latents=tb.cond_latents)
        return {"video": dit(gen, ref)["video"][:, p:]}

    return v


def sample_sr(template: ModuleTemplate, params, cond: Conditions, noise: dict,
              sigmas: jax.Array) -> dict:
    """Euler sampling of the refiner from ``noise`` along ``sigmas`` (inference's rule)."""
    v = sr_velocity_fn(template, params, cond)
    sigmas = jnp.asarray(sigmas, jnp.float32)

    def body(i, x):
        dt = sigmas[i + 1] - sigmas[i]
        return jax.tree.map(lambda a, b: a + dt * b, x, v(x, sigmas[i]))

    return jax.lax.fori_loop(0, sigmas.shape[0] - 1, body, noise)


class SRDMDStep(DMDStep):
    """distill_sr: DMD of the SR refiner to a ``sampling.num_steps``-step (default 1)
    generator. Per step: the generator predicts clean frames from noise (or, with backward
    simulation and more than one step, from its own k-th state), the fake score takes
    ``dmd.fake_updates`` flow-matching updates on them, and the generator moves by the
    difference of the teacher's and the fake score's velocities on its noised frames."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if not self.dit_cfg.cond_channels:
            raise ValueError("distill_sr trains the SR refiner: the config's DiT needs "
                             "cond_channels > 0 (get_model_config(name, 'sr'))")
        self.sr_scale = sr_scale_of(self.cfg)
        from avatarv_jax.models import factory
        self.spatial_stride = factory.vae_config(self.cfg).spatial_stride

    def conditions(self, frozen_params, batch) -> tuple[Conditions, dict]:
        frozen = {k: self.frozen[k].merge(v) for k, v in frozen_params.items()
                  if k != "teacher"}
        tb = encode_sr_batch(frozen, batch, self.sr_scale)
        return split_conditions(tb, self.num_prefix), frozen

    def guidance(self, b: int):
        return None     # inference runs the refiner unguided: one conditional pass

    def velocity(self, template, params, cond: Conditions, guidance) -> Callable:
        return sr_velocity_fn(template, params, cond)

    def compile(self, state, batch_example: Mapping):
        check_sr_batch(batch_example, self.sr_scale, self.spatial_stride)
        return super().compile(state, batch_example)


def train_flops_factor(cfg) -> float:
    """A step's DiT FLOPs in units of a flow-matching step on the same batch (3 forward
    passes): distill_sr counts 3 per fake update, the real and fake scores, and the
    generator's forward and backward (3), plus (n-1)/2 backward-simulation steps."""
    if cfg.stage == "sr":
        return 1.0
    if cfg.stage != "distill_sr":
        raise ValueError(f"{cfg.stage} is not an SR stage")
    n = int(cfg.sampling.num_steps)
    sim = (n - 1) / 2 if cfg.dmd.backward_simulation else 0.0
    return (sim + 3 * int(cfg.dmd.fake_updates) + 2 + 3) / 3.0


BUILDERS = {"sr": SRFlowStep, "distill_sr": SRDMDStep}
