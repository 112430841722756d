"""Helpers for tests and benchmarks: tiny configs and random model inputs."""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

from avatarv_jax.config import get_model_config
from avatarv_jax.models.dit import DiT, DiTConfig, GenInputs, RefInputs


def tiny_dit_config(**overrides) -> DiTConfig:
    cfg = DiTConfig.from_config(get_model_config("tiny").model)
    return dataclasses.replace(cfg, **overrides)


def perturb_zero_init(model: DiT, seed: int = 0) -> DiT:
    """Give zero-initialised output projections random values so every path is exercised."""
    graphdef, state = nnx.split(model)
    key = jax.random.key(seed)

    def fill(path, x):
        nonlocal key
        if isinstance(x, jax.Array) and x.size and not jnp.any(x):
            key, sub = jax.random.split(key)
            return 0.05 * jax.random.normal(sub, x.shape, x.dtype)
        return x

    state = jax.tree_util.tree_map_with_path(fill, state)
    return nnx.merge(graphdef, state)


def random_inputs(cfg: DiTConfig, *, batch=2, gen_frames=3, ref_frames=2, size=(8, 8), seed=0,
                  text_len=5, motion=True, audio=True, prefix_frames=0):
    keys = iter(jax.random.split(jax.random.key(seed), 16))
    h, w = size
    c = cfg.in_channels

    def normal(shape):
        return jax.random.normal(next(keys), shape, jnp.float32)

    timesteps = jnp.full((batch, gen_frames), 700.0).at[:, :prefix_frames].set(0.0)
    gen = GenInputs(
        latents=normal((batch, gen_frames, h, w, c)), timesteps=timesteps,
        text=normal((batch, text_len, cfg.text_dim)),
        motion=normal((batch, gen_frames, cfg.packed_motion_dim)) if motion else None,
        audio=normal((batch, 1 + 4 * (gen_frames - 1), cfg.audio_dim)) if audio else None)
    ref = None
    if ref_frames:
        ref = RefInputs(
            latents=normal((batch, ref_frames, h, w, c)),
            motion=normal((batch, ref_frames, cfg.packed_motion_dim)) if motion else None,
            audio=normal((batch, 1 + 4 * (ref_frames - 1), cfg.audio_dim)) if audio else None)
    return gen, ref


def sigterm_at(dataset, kill_at: int | None):
    """The Grain dataset, sending SIGTERM to this process when element ``kill_at`` is drawn
    (preemption in the trainer's resume tests)."""
    import os
    import signal

    def maybe_kill(i, element):
        if i == kill_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return element

    return dataset.map_with_index(maybe_kill)


def quick_stage_config(stage: str, num_steps: int, init_from: str = "", warmup_steps: int = 1):
    """The tiny config of ``stage`` as the trainer tests run it: ``num_steps`` steps of batch 2,
    a log line per step, no progress bar, checkpoints only at SIGTERM and at the end."""
    from avatarv_jax.training.stage_config import stage_config
    cfg = stage_config(stage, "tiny")
    cfg.init_from = init_from
    cfg.train.num_steps = num_steps
    cfg.train.log_every = 1
    cfg.train.progress_bar = False
    cfg.optimizer.warmup_steps = warmup_steps
    cfg.checkpoint.every_steps = 100
    cfg.data.batch_size = 2
    return cfg


def posttrain_setup(cfg, total_steps: int):
    """(builder, state, frozen params) of a stage-4/5 step for ``cfg`` (tiny): fresh models with
    the zero-initialised layers perturbed, the student's copy as the frozen ``teacher``, no EMA.
    What the post-training step tests build before taking a step."""
    from avatarv_jax.models import factory
    from avatarv_jax.parallel.mesh import make_mesh
    from avatarv_jax.posttrain.stages import BUILDERS, teacher_template
    from avatarv_jax.training.checkpoints import FROZEN_MODELS
    from avatarv_jax.training.optimizer import make_optimizer
    from avatarv_jax.training.state import create_train_state
    from avatarv_jax.training.step import ModuleTemplate, module_params

    models = factory.build_models(cfg, seed=0)
    models["dit"] = perturb_zero_init(models["dit"], seed=1)
    templates = {k: ModuleTemplate(m) for k, m in models.items()}
    frozen_t = {k: templates[k] for k in FROZEN_MODELS}
    frozen_t["teacher"] = teacher_template(cfg)
    tx, schedule = make_optimizer(cfg.optimizer, templates["dit"].logical_axes(), total_steps)
    builder = BUILDERS[cfg.stage](dit=templates["dit"], frozen=frozen_t, tx=tx,
                                  schedule=schedule, cfg=cfg, stage=cfg.stage,
                                  mesh=make_mesh(dict(cfg.mesh)))
    params = {k: module_params(m) for k, m in models.items()}
    frozen = {k: params[k] for k in FROZEN_MODELS}
    frozen["teacher"] = jax.tree.map(jnp.copy, params["dit"])
    return builder, create_train_state(params["dit"], tx, use_ema=False), frozen


def write_astronaut_videos(root, size: int, num_frames: int):
    """GEN/{a,b}.mp4 and REF/{a,b}.mp4 under ``root`` for the real-video eval tests: the
    astronaut (scikit-image) at ``size`` px, jittered by 0-2 px, clip b shifted by 4 px; GEN is
    REF played backwards, with the same noise audio. Returns (gen_dir, ref_dir)."""
    import numpy as np
    from skimage import data
    from skimage.transform import resize

    from avatarv_jax.data.avatarworld.media import write_mp4

    face = (resize(data.astronaut(), (size, size)) * 255).astype(np.uint8)
    rng = np.random.default_rng(0)
    gen, ref = root / "gen", root / "ref"
    gen.mkdir()
    ref.mkdir()
    for name, dx in (("a", 0), ("b", 4)):
        frames = np.stack([np.roll(face, dx + (t % 3), axis=1) for t in range(num_frames)])
        audio = (0.1 * rng.standard_normal(num_frames * 640)).astype(np.float32)
        write_mp4(str(ref / f"{name}.mp4"), frames, audio)
        write_mp4(str(gen / f"{name}.mp4"), frames[::-1].copy(), audio)
    return gen, ref


def attention_impl_errors(cfg: DiTConfig, impl: str):
    """The tiny DiT with ``attention_impl=impl`` against the dense-mask ``xla`` one (same
    parameters; REF valid frames [2, 1]): ({output: (max abs error, relative error)}, worst
    relative parameter-gradient error)."""
    graphdef, state = nnx.split(perturb_zero_init(DiT(cfg, rngs=nnx.Rngs(0))))
    gen, ref = random_inputs(cfg, batch=2, gen_frames=2, ref_frames=2, size=(4, 4),
                             prefix_frames=1)
    ref = ref.replace(valid_frames=jnp.array([2, 1]))
    other = nnx.graphdef(DiT(dataclasses.replace(cfg, attention_impl=impl), rngs=nnx.Rngs(0)))

    def run(graphdef):
        def loss(state):
            out = nnx.merge(graphdef, state)(gen, ref)
            return jnp.mean(out["video"] ** 2) + jnp.mean(out["motion"] ** 2), out
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(state)

    (_, want), want_grads = run(graphdef)
    (_, got), got_grads = run(other)
    outputs = {}
    for key in ("video", "motion"):
        err = float(jnp.abs(got[key] - want[key]).max())
        outputs[key] = (err, err / float(jnp.abs(want[key]).max()))
    worst = max(jax.tree.leaves(jax.tree.map(
        lambda a, b: float(jnp.abs(a - b).max() / (jnp.abs(b).max() + 1e-6)),
        got_grads, want_grads)))
    return outputs, worst


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` of this checkout (scripts, not package modules)."""
    path = pathlib.Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
