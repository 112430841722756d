"""Train steps of stages 4-5 on the DiT (DESIGN §5), on the trainer's machinery.

Each is a ``TrainStepBuilder`` whose ``train_step`` replaces the flow-matching update; sharding,
donation, the NaN guard, EMA, Orbax checkpoints and exact resume are the trainer's. The trained
model is always ``TrainState.params`` (what inference loads); the previous stage's DiT is the
frozen ``teacher`` (teacher, real score or reference model); DMD's fake score lives in
``TrainState.aux``. Every stage reads SFT batches: the driving clip's GEN frames (the first
``train.num_prefix_frames`` latent frames stay clean, as in inference's chunk continuation),
its audio, text and motion, and a reference clip of the same person.

Randomness is ``fold_in(seed, step)`` as in stages 1-3, so a resumed run draws the same noise.
The algorithms themselves (losses, SDE, advantages) are model-agnostic and live beside this
module; this one only says how the DiT and the batch plug into them.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from avatarv_jax.diffusion.flow import (noise_latents, resolution_shift,
                                        sample_training_sigma, sigma_to_timestep)
from avatarv_jax.diffusion.guidance import guided_velocity
from avatarv_jax.diffusion.objective import TrainBatch
from avatarv_jax.diffusion.samplers import sigma_schedule
from avatarv_jax.models.dit import DiT, DiTConfig, GenInputs, RefInputs
from avatarv_jax.posttrain import dmd, dpo, grpo, guidance_distill, sde
from avatarv_jax.training.batch import _latents, _pixels, encode_batch
from avatarv_jax.training.optimizer import make_optimizer
from avatarv_jax.training.stage_config import POSTTRAIN_STAGES, data_stage
from avatarv_jax.training.step import ModuleTemplate, TrainStepBuilder

PASSES = ("uncond", "text", "full")


def teacher_config(cfg) -> DiTConfig:
    """The frozen previous-stage DiT: the student's config, with the guidance embedding only
    when the previous stage had one (every stage after ``distill_cfg``)."""
    from avatarv_jax.models import factory
    student = factory.dit_config(cfg)
    return dataclasses.replace(student, guidance_embed=cfg.stage != "distill_cfg")


def teacher_template(cfg) -> ModuleTemplate:
    dit_cfg = teacher_config(cfg)
    return ModuleTemplate(nnx.eval_shape(lambda: DiT(dit_cfg, rngs=nnx.Rngs(0))))


# -- the DiT as a velocity function over the noisy frames --------------------------------------

@dataclasses.dataclass(frozen=True)
class Conditions:
    """One batch's encoded conditions and clean data, split at the clean prefix."""

    batch: TrainBatch
    prefix: dict            # clean prefix frames {'video', 'motion'}: [B, P, ...]
    x0: dict                # clean frames to generate {'video', 'motion'}: [B, F - P, ...]

    @property
    def size(self) -> int:
        return self.batch.latents.shape[0]

    def repeat(self, times: int) -> "Conditions":
        """Each sample ``times`` times in a row (G samples per condition)."""
        rep = lambda x: None if x is None else jnp.repeat(x, times, axis=0)
        return Conditions(jax.tree.map(rep, self.batch), jax.tree.map(rep, self.prefix),
                          jax.tree.map(rep, self.x0))


def split_conditions(tb: TrainBatch, num_prefix: int) -> Conditions:
    clean = {"video": tb.latents}
    if tb.motion is not None:
        clean["motion"] = tb.motion
    return Conditions(tb, {k: v[:, :num_prefix] for k, v in clean.items()},
                      {k: v[:, num_prefix:] for k, v in clean.items()})


def velocity_fn(template: ModuleTemplate, params, cond: Conditions, *, which: str = "full",
                guidance: jax.Array | None = None) -> Callable:
    """``v(x, sigma)`` of the DiT for the noisy frames ``x`` behind the clean prefix; sigma
    scalar or [B]. ``which`` is the guidance pass (conditions kept); ``guidance`` [B, 2] the
    scales of a guidance-distilled DiT."""
    if which not in PASSES:
        raise ValueError(f"unknown guidance pass {which!r}; expected one of {PASSES}")
    dit = template.merge(params)
    tb = cond.batch
    b = cond.size
    p = cond.prefix["video"].shape[1]
    keep = 0.0 if which == "uncond" else 1.0
    text = tb.text * keep
    audio_mask = jnp.full((b,), 1.0 if which == "full" else 0.0, jnp.float32)
    ref = None
    if tb.ref_latents is not None:
        valid = tb.ref_latents.shape[1] if which != "uncond" else 0
        ref = RefInputs(latents=tb.ref_latents, motion=tb.ref_motion, audio=tb.ref_audio,
                        valid_frames=jnp.full((b,), valid, jnp.int32))

    def v(x, sigma):
        full = {k: jnp.concatenate([cond.prefix[k], x[k]], axis=1) for k in x}
        f = full["video"].shape[1]
        sig = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1, 1), (b, 1))
        frame_sigma = jnp.where(jnp.arange(f)[None] < p, 0.0, sig)
        gen = GenInputs(latents=full["video"], timesteps=sigma_to_timestep(frame_sigma),
                        text=text, motion=full.get("motion"), audio=tb.audio,
                        audio_mask=audio_mask, guidance=guidance)
        out = dit(gen, ref)
        return {k: out[k][:, p:] for k in x}

    return v


def guided_teacher_velocity(template, params, cond, x, sigma, text_scale, audio_scale):
    """The teacher's multi-condition classifier-free-guided velocity (three passes)."""
    passes = {w: velocity_fn(template, params, cond, which=w)(x, sigma) for w in PASSES}
    return guided_velocity(passes["uncond"], passes["text"], passes["full"],
                           text_scale=text_scale, audio_scale=audio_scale)


def _sigmas_per_sample(key, b, cfg, latents, dit_cfg) -> jax.Array:
    """Training noise levels [B], drawn as in stages 1-3 (logit-normal, shifted)."""
    shift = float(cfg.flow.shift)
    if not shift:
        _, ph, pw = dit_cfg.patch_size
        shift = resolution_shift((latents.shape[2] // ph) * (latents.shape[3] // pw))
    return sample_training_sigma(key, (b,), logit_mean=cfg.flow.logit_mean,
                                 logit_std=cfg.flow.logit_std, shift=shift)


def _normal_like(key, tree):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, jnp.float32)
                                        for k, x in zip(keys, leaves)])


def _guidance(cfg, b: int) -> jax.Array:
    scales = jnp.asarray([cfg.sampling.text_scale, cfg.sampling.audio_scale], jnp.float32)
    return jnp.broadcast_to(scales, (b, 2))


class PosttrainStep(TrainStepBuilder):
    """Shared parts: the frozen teacher, SFT batches encoded and split at the prefix."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        from avatarv_jax.models import factory
        self.dit_cfg = factory.dit_config(self.cfg)
        if "teacher" not in self.frozen:
            raise ValueError(f"stage {self.stage} needs the frozen previous-stage DiT "
                             "('teacher') among the frozen models")

    def conditions(self, frozen_params, batch) -> tuple[Conditions, dict]:
        frozen = {k: self.frozen[k].merge(v) for k, v in frozen_params.items()
                  if k != "teacher"}
        tb = encode_batch(frozen, batch, data_stage(self.stage))
        return split_conditions(tb, self.num_prefix), frozen

    def decode_frames(self, frozen, cond: Conditions, x0: dict) -> jax.Array:
        """Generated latents (behind the clean prefix) -> frames [B, T, H, W, 3] in [-1, 1]."""
        latents = jnp.concatenate([cond.prefix["video"], x0["video"]], axis=1)
        return jax.lax.stop_gradient(frozen["vae"].decode(latents))

    def reference_frames(self, frozen, batch, cond: Conditions) -> jax.Array:
        if "ref_video" in batch:
            return _pixels(batch["ref_video"])
        return jax.lax.stop_gradient(frozen["vae"].decode(cond.batch.ref_latents))


class GuidanceDistillStep(PosttrainStep):
    """distill_cfg: the student, told the scales, matches the teacher's 3-pass guided velocity
    in one pass (``posttrain.guidance_distill``)."""

    def train_step(self, state, frozen_params, batch, key):
        cond, _ = self.conditions(frozen_params, batch)
        k_sigma, k_noise, k_scale = jax.random.split(key, 3)
        b = cond.size
        sigma = _sigmas_per_sample(k_sigma, b, self.cfg, cond.batch.latents, self.dit_cfg)
        x_t = noise_latents(cond.x0, _normal_like(k_noise, cond.x0), sigma)
        d = self.cfg.distill
        ts, aus = guidance_distill.sample_guidance_scales(
            k_scale, b, text_range=tuple(d.text_scale_range), audio_range=tuple(d.audio_scale_range))
        target = jax.lax.stop_gradient(guided_teacher_velocity(
            self.frozen["teacher"], frozen_params["teacher"], cond, x_t, sigma, ts, aus))
        guidance = jnp.stack([ts, aus], axis=-1)

        def loss_fn(p):
            pred = velocity_fn(self.dit, p, cond, guidance=guidance)(x_t, sigma)
            return guidance_distill.guidance_distill_loss(pred, target)

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return self.apply_gradients(state, grads, loss, dict(terms))


class DMDStep(PosttrainStep):
    """distill_dmd: a few-step generator (``sampling.num_steps`` Euler steps of the student)
    against the frozen teacher as the real score and a trained fake score (``posttrain.dmd``).

    Per step: the generator runs its own first ``k`` steps from noise (k drawn per step,
    backward simulation, no gradient) and predicts clean frames from there; the fake score
    takes ``dmd.fake_updates`` flow-matching updates on those frames; the generator is then
    moved by the difference of the two scores on its noised frames.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        d = self.cfg.dmd
        opt = self.cfg.optimizer.copy_and_resolve_references()
        with opt.unlocked():
            opt.learning_rate = float(d.fake_learning_rate) or float(opt.learning_rate)
            opt.ema_decay = 0.0
        self.fake_tx, _ = make_optimizer(opt, self.dit.logical_axes(),
                                         int(self.cfg.train.num_steps))
        self.steps = int(self.cfg.sampling.num_steps)
        if int(d.fake_updates) < 1:
            raise ValueError(f"dmd.fake_updates must be >= 1, got {d.fake_updates}")
        self.sigmas = sigma_schedule(self.steps, shift=float(self.cfg.sampling.shift))

    def initial_aux(self, params):
        return {"params": params, "opt_state": self.fake_tx.init(params)}

    def guidance(self, b: int):
        """What the velocities are conditioned on besides ``cond`` (the student's scales)."""
        return _guidance(self.cfg, b)

    def velocity(self, template, params, cond: Conditions, guidance) -> Callable:
        """``v(x, sigma)`` of the generator, the fake score and the teacher alike."""
        return velocity_fn(template, params, cond, guidance=guidance)

    def generator_start(self, params, cond, key, guidance):
        """(x at sigma_k, sigma_k): the generator's own first k Euler steps from noise."""
        k_noise, k_stop = jax.random.split(key)
        x = _normal_like(k_noise, cond.x0)
        if not bool(self.cfg.dmd.backward_simulation) or self.steps == 1:
            return x, self.sigmas[0]
        stop = jax.random.randint(k_stop, (), 0, self.steps)
        v = self.velocity(self.dit, jax.lax.stop_gradient(params), cond, guidance)

        def body(i, x):
            dt = self.sigmas[i + 1] - self.sigmas[i]
            return jax.tree.map(lambda a, b: a + dt * b, x, v(x, self.sigmas[i]))

        x = jax.lax.fori_loop(0, stop, body, x)
        return jax.lax.stop_gradient(x), self.sigmas[stop]

    def train_step(self, state, frozen_params, batch, key):
        cond, _ = self.conditions(frozen_params, batch)
        b = cond.size
        guidance = self.guidance(b)
        k_start, k_fake, k_gen = jax.random.split(key, 3)
        x_k, sigma_k = self.generator_start(state.params, cond, k_start, guidance)

        def generate(p):
            v = self.velocity(self.dit, p, cond, guidance)(x_k, sigma_k)
            return jax.tree.map(lambda x, vv: dmd.predicted_x0(x, vv, sigma_k), x_k, v)

        # One generator forward serves both: its frames for the scores, its VJP for the update.
        x0_gen, pullback = jax.vjp(generate, state.params)
        x0_gen = jax.lax.stop_gradient(x0_gen)

        # Fake score: flow matching on the generator's frames.
        fake = state.aux
        fake_finite = jnp.array(True)
        for kj in jax.random.split(k_fake, int(self.cfg.dmd.fake_updates)):
            k_s, k_n = jax.random.split(kj)
            sig = _sigmas_per_sample(k_s, b, self.cfg, cond.batch.latents, self.dit_cfg)
            noise = _normal_like(k_n, x0_gen)
            x_t = noise_latents(x0_gen, noise, sig)

            def fake_loss(p):
                pred = self.velocity(self.dit, p, cond, guidance)(x_t, sig)
                return dmd.fake_score_loss(pred, x0_gen, noise)

            (lf, _), gf = jax.value_and_grad(fake_loss, has_aux=True)(fake["params"])
            upd, opt = self.fake_tx.update(gf, fake["opt_state"], fake["params"])
            fake_finite = fake_finite & jnp.isfinite(lf) & jnp.isfinite(optax.global_norm(gf))
            fake = {"params": optax.apply_updates(fake["params"], upd), "opt_state": opt}

        # Generator: real minus fake score on its noised frames (scores without gradient).
        k_s, k_n = jax.random.split(k_gen)
        sig = jax.random.uniform(k_s, (b,), minval=0.02, maxval=0.98)
        x_t = noise_latents(x0_gen, _normal_like(k_n, x0_gen), sig)
        v_real = jax.lax.stop_gradient(self.velocity(
            self.frozen["teacher"], frozen_params["teacher"], cond, guidance)(x_t, sig))
        v_fake = jax.lax.stop_gradient(self.velocity(
            self.dit, fake["params"], cond, guidance)(x_t, sig))

        def gen_loss(x0):
            return dmd.dmd_generator_loss(x0, x_t, sig, v_real, v_fake)

        (loss, terms), grad_x0 = jax.value_and_grad(gen_loss, has_aux=True)(x0_gen)
        (grads,) = pullback(grad_x0)
        terms = {"dmd_grad_rms": terms["grad_norm"], "dmd_normalizer": terms["normalizer"],
                 "fake_loss": lf, "sigma_start": sigma_k}
        return self.apply_gradients(state, grads, loss, terms, aux=fake,
                                    aux_finite=fake_finite)


class _RewardedStep(PosttrainStep):
    """Shared by GRPO and DPO: sample G videos per condition and score them. The probe
    rewards (``posttrain.rewards``) need AvatarWorld batches; ``lse_c`` and
    ``face_similarity`` (``posttrain.real_rewards``) work on real video (``lse_c`` needs
    waveform audio and face/mouth masks). Only the weighted rewards are computed."""

    section = ""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        from avatarv_jax.posttrain.real_rewards import (
            REAL_REWARDS,
            FaceSimilarityReward,
            LseCReward,
        )
        from avatarv_jax.posttrain.rewards import REWARDS, ProbeRewards, check_weights
        s = self.cfg[self.section]
        self.weights = check_weights(dict(s.reward_weights))
        self.group = int(s.group_size)
        if self.group < 2:
            raise ValueError(f"{self.section}.group_size must be >= 2, got {self.group}")
        self.sigmas = sigma_schedule(int(s.sampling_steps), shift=float(self.cfg.sampling.shift))
        self.rewards = ProbeRewards() if set(self.weights) & set(REWARDS) else None
        self.lse_c = LseCReward() if "lse_c" in self.weights else None
        self.face = FaceSimilarityReward() if "face_similarity" in self.weights else None
        assert set(self.weights) <= set(REWARDS) | set(REAL_REWARDS)

    def check_reward_fields(self, batch) -> None:
        """Before any sampling is traced: the weighted rewards' batch fields are there."""
        from avatarv_jax.posttrain.real_rewards import check_batch_fields
        check_batch_fields(self.weights, batch)

    def score(self, frozen, batch, cond: Conditions, rep: Conditions, x0: dict):
        """Combined and per-reward scores [B * G] of the samples ``x0`` of ``rep`` (each
        condition of ``cond`` repeated G times)."""
        frames = self.decode_frames(frozen, rep, x0)
        repeat = lambda x: jnp.repeat(x, self.group, axis=0)
        parts = {}
        ref = None
        if self.rewards is not None or self.face is not None:
            ref = repeat(self.reference_frames(frozen, batch, cond))
        if self.rewards is not None:
            probe = self.rewards(frames, {"motion": repeat(batch["motion"])}, ref)
            parts.update({k: v for k, v in probe.items() if k in self.weights})
        if self.lse_c is not None:
            parts["lse_c"] = self.lse_c(frames, {k: repeat(batch[k]) for k in
                                                 ("audio", "mask_mouth", "mask_face")})
        if self.face is not None:
            parts["face_similarity"] = self.face(frames, ref)
        return grpo.combine_rewards(parts, self.weights), parts


class GRPOStep(_RewardedStep):
    """grpo: Flow-GRPO. G SDE samples per condition from the current policy (exact Gaussian
    transition log-probabilities), probe rewards, group-normalised advantages, the clipped
    ratio on a random subset of the sampling steps, and a KL tie to the frozen reference."""

    section = "grpo"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if int(self.cfg.grpo.inner_updates) < 1:
            raise ValueError(f"grpo.inner_updates must be >= 1, got {self.cfg.grpo.inner_updates}")

    def train_step(self, state, frozen_params, batch, key):
        g = self.cfg.grpo
        self.check_reward_fields(batch)
        cond, frozen = self.conditions(frozen_params, batch)
        b = cond.size
        rep = cond.repeat(self.group)
        guidance = _guidance(self.cfg, b * self.group)
        k_noise, k_sde, k_steps = jax.random.split(key, 3)
        noise = _normal_like(k_noise, rep.x0)
        policy = velocity_fn(self.dit, jax.lax.stop_gradient(state.params), rep,
                             guidance=guidance)
        traj = sde.sample_sde(policy, noise, self.sigmas, float(g.noise_level), k_sde)
        x0 = jax.tree.map(lambda s: s[-1], traj.states)
        reward, parts = self.score(frozen, batch, cond, rep, x0)
        adv = grpo.group_advantages(reward.reshape(b, self.group)).reshape(-1)
        steps = grpo.select_train_steps(k_steps, self.sigmas.shape[0] - 1, int(g.train_steps))
        ref_v = velocity_fn(self.frozen["teacher"], frozen_params["teacher"], rep,
                            guidance=guidance)

        size = sum(leaf[0].size for leaf in jax.tree.leaves(rep.x0))

        def loss_fn(p):
            v_p = velocity_fn(self.dit, p, rep, guidance=guidance)

            def one(j):
                x = jax.tree.map(lambda s: s[j], traj.states)
                x_next = jax.tree.map(lambda s: s[j + 1], traj.states)
                s, s_next = self.sigmas[j], self.sigmas[j + 1]
                mean_p, std = sde.sde_transition(x, v_p(x, s), s, s_next, float(g.noise_level))
                mean_r, _ = sde.sde_transition(x, jax.lax.stop_gradient(ref_v(x, s)), s, s_next,
                                               float(g.noise_level))
                logp = sde.transition_logprob(x_next, mean_p, std)
                kl = grpo.transition_kl(mean_p, mean_r, std)
                # The ratio uses log-probabilities per latent element (as Flow-GRPO does):
                # summed over a video's elements, any update makes exp(log-ratio) explode.
                return grpo.grpo_loss(logp / size, traj.logprobs[j] / size, adv,
                                      clip_range=float(g.clip_range), kl=kl / size,
                                      kl_weight=float(g.kl_weight))

            losses, terms = [], []
            for i in range(int(g.train_steps)):
                l, t = one(steps[i])
                losses.append(l)
                terms.append(t)
            return sum(losses) / len(losses), jax.tree.map(lambda *a: sum(a) / len(a), *terms)

        extra = {"reward": reward.mean(), **{f"reward_{k}": v.mean() for k, v in parts.items()}}
        s = state
        for _ in range(int(g.inner_updates)):
            (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(s.params)
            s, metrics = self.apply_gradients(s, grads, loss, dict(terms, **extra))
            s = s.replace(step=state.step)
        return s.replace(step=state.step + 1), metrics


class DPOStep(_RewardedStep):
    """dpo: Diffusion-DPO (``posttrain.dpo``). With ``dpo.pairs="auto"`` the frozen reference
    samples G videos per condition (ODE, ``dpo.sampling_steps``), the rewards rank them, best
    and worst form the pair. With ``dpo.pairs`` a JSONL manifest of human labels the pairs
    come from the data (``posttrain.preference_data``): the batch's ``video`` is the preferred
    one, ``rejected_video`` the other, both encoded by the frozen VAE here. Either way the loss
    compares the policy's and the reference's flow-matching errors on both sides, with the
    same noise and noise level for the two."""

    section = "dpo"

    def __init__(self, **kwargs):
        cfg = kwargs["cfg"]
        self.human_pairs = str(cfg.dpo.pairs) != "auto"
        if self.human_pairs:   # no sampling, no rewards: the labels rank the pair
            PosttrainStep.__init__(self, **kwargs)
        else:
            super().__init__(**kwargs)

    def human_pair_step(self, state, frozen_params, batch, key):
        """DPO on a labelled pair. Each side keeps its own clean prefix frames (the condition
        both were generated from is the reference, audio and caption; a video's first latent
        frame is its own). The preference is scored on the video latents; the motion stream
        (from sidecars, zero without) is noised with the same noise and fed, but the labels
        judge what they saw, the video."""
        d = self.cfg.dpo
        if "rejected_video" not in batch and "rejected_latents" not in batch:
            raise ValueError("dpo.pairs names a manifest but the batch has no rejected_video "
                             "(expected batches of posttrain.preference_data); it has "
                             f"{sorted(batch)}")
        cond_w, frozen = self.conditions(frozen_params, batch)
        lat_l = _latents(frozen["vae"], batch, "rejected_video", "rejected_latents")
        tb_l = dataclasses.replace(cond_w.batch, latents=lat_l)
        if cond_w.batch.motion is not None:
            from avatarv_jax.models.motion import pack_motion
            tb_l = dataclasses.replace(tb_l, motion=pack_motion(
                batch.get("rejected_motion", batch["motion"]).astype(jnp.float32)))
        cond_l = split_conditions(tb_l, self.num_prefix)
        b = cond_w.size
        k_sigma, k_eps = jax.random.split(key)
        sigma = _sigmas_per_sample(k_sigma, b, self.cfg, cond_w.batch.latents, self.dit_cfg)
        eps = _normal_like(k_eps, cond_w.x0)
        x_w, x_l = cond_w.x0, cond_l.x0
        xt_w, xt_l = noise_latents(x_w, eps, sigma), noise_latents(x_l, eps, sigma)
        guidance = _guidance(self.cfg, b)
        ref_t, ref_p = self.frozen["teacher"], frozen_params["teacher"]

        def errors(template, params, cond, x_t, x_clean):
            v = velocity_fn(template, params, cond, guidance=guidance)(x_t, sigma)
            return dpo.flow_errors({"video": v["video"]}, {"video": x_clean["video"]},
                                   {"video": eps["video"]})

        e_rw = jax.lax.stop_gradient(errors(ref_t, ref_p, cond_w, xt_w, x_w))
        e_rl = jax.lax.stop_gradient(errors(ref_t, ref_p, cond_l, xt_l, x_l))

        def loss_fn(p):
            e_pw = errors(self.dit, p, cond_w, xt_w, x_w)
            e_pl = errors(self.dit, p, cond_l, xt_l, x_l)
            return dpo.diffusion_dpo_loss(e_pw, e_pl, e_rw, e_rl, beta=float(d.beta))

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        extra = {"ref_error_preferred": e_rw.mean(), "ref_error_rejected": e_rl.mean()}
        return self.apply_gradients(state, grads, loss, dict(terms, **extra))

    def train_step(self, state, frozen_params, batch, key):
        if self.human_pairs:
            return self.human_pair_step(state, frozen_params, batch, key)
        self.check_reward_fields(batch)
        d = self.cfg.dpo
        cond, frozen = self.conditions(frozen_params, batch)
        b = cond.size
        rep = cond.repeat(self.group)
        k_noise, k_sigma, k_eps = jax.random.split(key, 3)
        ref_t, ref_p = self.frozen["teacher"], frozen_params["teacher"]
        ref_v = velocity_fn(ref_t, ref_p, rep, guidance=_guidance(self.cfg, b * self.group))
        x = _normal_like(k_noise, rep.x0)
        for i in range(self.sigmas.shape[0] - 1):
            dt = self.sigmas[i + 1] - self.sigmas[i]
            x = jax.tree.map(lambda a, v: a + dt * v, x, ref_v(x, self.sigmas[i]))
        x0 = jax.lax.stop_gradient(x)
        reward, parts = self.score(frozen, batch, cond, rep, x0)
        best, worst, keep = dpo.rank_pairs(reward.reshape(b, self.group),
                                           min_margin=float(d.min_reward_margin))
        pick = lambda idx: jax.tree.map(
            lambda a: a.reshape((b, self.group) + a.shape[1:])[jnp.arange(b), idx], x0)
        x_w, x_l = pick(best), pick(worst)

        sigma = _sigmas_per_sample(k_sigma, b, self.cfg, cond.batch.latents, self.dit_cfg)
        eps = _normal_like(k_eps, x_w)
        xt_w, xt_l = noise_latents(x_w, eps, sigma), noise_latents(x_l, eps, sigma)
        guidance = _guidance(self.cfg, b)

        def errors(template, params, x_t, x_clean):
            v = velocity_fn(template, params, cond, guidance=guidance)(x_t, sigma)
            return dpo.flow_errors(v, x_clean, eps)

        e_rw = jax.lax.stop_gradient(errors(ref_t, ref_p, xt_w, x_w))
        e_rl = jax.lax.stop_gradient(errors(ref_t, ref_p, xt_l, x_l))
        weight = keep.astype(jnp.float32)

        def loss_fn(p):
            e_pw, e_pl = errors(self.dit, p, xt_w, x_w), errors(self.dit, p, xt_l, x_l)
            per, terms = jax.vmap(lambda a, bb, c, dd: dpo.diffusion_dpo_loss(
                a[None], bb[None], c[None], dd[None], beta=float(d.beta)))(e_pw, e_pl, e_rw, e_rl)
            loss = (per * weight).sum() / jnp.maximum(weight.sum(), 1.0)
            return loss, jax.tree.map(jnp.mean, terms)

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        extra = {"reward": reward.mean(), "pairs_kept": weight.mean(),
                 "reward_margin": (reward.reshape(b, -1).max(1) - reward.reshape(b, -1).min(1)
                                   ).mean(), **{f"reward_{k}": v.mean() for k, v in parts.items()}}
        return self.apply_gradients(state, grads, loss, dict(terms, **extra))


def train_flops_factor(cfg) -> float:
    """A step's DiT FLOPs in units of a stage-3 training step on the same batch (forward and
    backward = 3 forward passes). Counted passes: distill_cfg 3 teacher + 3 student;
    distill_dmd (n-1)/2 backward-simulation steps on average, 3 per fake update, real and
    fake scores, 3 generator (its one forward and the backward); grpo G x (S sampling + inner x T x (3 + 1 reference));
    dpo G x S sampling + 2 reference + 2 x 3 policy (human pairs: no sampling)."""
    stage = cfg.stage
    if stage == "distill_cfg":
        passes = 6.0
    elif stage == "distill_dmd":
        n = int(cfg.sampling.num_steps)
        sim = (n - 1) / 2 if cfg.dmd.backward_simulation else 0.0
        passes = sim + 3 * int(cfg.dmd.fake_updates) + 2 + 3
    elif stage == "grpo":
        g = cfg.grpo
        passes = int(g.group_size) * (int(g.sampling_steps)
                                      + int(g.inner_updates) * int(g.train_steps) * 4)
    elif stage == "dpo":
        d = cfg.dpo
        sampling = 0 if str(d.pairs) != "auto" else int(d.group_size) * int(d.sampling_steps)
        passes = sampling + 2 + 6
    else:
        raise ValueError(f"{stage} is not a stage 4-5")
    return passes / 3.0


BUILDERS = {"distill_cfg": GuidanceDistillStep, "distill_dmd": DMDStep, "grpo": GRPOStep,
            "dpo": DPOStep}
assert set(BUILDERS) == set(POSTTRAIN_STAGES)
