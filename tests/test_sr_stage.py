"""The SR refiner's stages (DESIGN §4): ``sr`` (flow matching on high-res / downscaled pairs,
started by surgery from the tiny SFT checkpoint in tests/data) and ``distill_sr`` (DMD to one
step), the SR batch against inference's condition, the checkpoint -> inference loader round
trip, and (slow) exact resume after SIGTERM."""

import os
import subprocess
import sys
import textwrap
import types

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from avatarv_jax.training.checkpoints import resolve_step_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# An SFT checkpoint of the tiny preset (stride-8 VAE), kept for the tests: tests/data/README.md.
SFT_TINY = os.path.join(ROOT, "tests", "data", "sft_tiny")
HIGH = 64          # SR training resolution: sr_scale 2 x the tiny base resolution 32
SR_STEPS = 6
DISTILL_STEPS = 6
# DMD matches distributions, not noise-to-sample pairs: at 1e-3 the tiny student overshoots
# (paired RMS to the teacher's 4-step sample rose 0.244 -> 0.298 in 6 updates); at 1e-4 it
# falls on every noise draw tried (0.247 -> 0.243).
DISTILL_LR = 1e-4


def sr_batch(index=0):
    from avatarv_jax.training.synthetic import synthetic_batch
    return synthetic_batch(index, "sft", batch_size=2, num_frames=5, ref_frames=5,
                           resolution=HIGH, text_len=8)


def data(num, kill_at=None):
    """The same SFT batch at 64 px ``num`` times (a Grain dataset: checkpointable); element
    ``kill_at`` sends SIGTERM to this process when drawn."""
    from avatarv_jax.testing import sigterm_at
    batch = sr_batch()
    ds = grain.MapDataset.range(num).map(lambda i: batch).to_iter_dataset()
    return sigterm_at(ds, kill_at)


def config_for(stage, init_from, num_steps):
    from avatarv_jax.testing import quick_stage_config
    return quick_stage_config(stage, num_steps, init_from)


def numeric(batch):
    return {k: jnp.asarray(v) for k, v in batch.items() if np.asarray(v).dtype.kind in "biuf"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """sr from the tiny SFT checkpoint (``dsr``: distill_sr from it, made on first use)."""
    from avatarv_jax.training.trainer import train
    out = tmp_path_factory.mktemp("sr_runs")
    logs = []
    sr = train(config_for("sr", SFT_TINY, SR_STEPS), out / "sr", data=data(SR_STEPS),
               log=logs.append)
    return types.SimpleNamespace(out=out, sr=sr, logs=logs)


@pytest.fixture(scope="module")
def distilled(runs):
    from avatarv_jax.training.trainer import train
    cfg = config_for("distill_sr", str(runs.out / "sr"), DISTILL_STEPS)
    cfg.optimizer.learning_rate = DISTILL_LR
    runs.dsr = train(cfg, runs.out / "distill_sr", data=data(DISTILL_STEPS))
    return runs


@pytest.fixture(scope="module")
def encoded(runs):
    """The sr run's models (the SFT checkpoint's frozen VAE and encoders) and, in one jitted
    call, the SR TrainBatch of ``sr_batch()``, the VAE latents of its frames at 64 px and at
    32 px."""
    from avatarv_jax.training.sr_batch import encode_sr_batch
    models = frozen_models(config_for("sr", SFT_TINY, 1), runs.out / "sr")
    batch = numeric(sr_batch())

    @jax.jit
    def encode(batch):
        pixels = batch["video"].astype(jnp.float32) / 127.5 - 1.0
        small = jax.image.resize(pixels, (2, 5, 32, 32, 3), "linear")
        return (encode_sr_batch(models, batch, 2), models["vae"].encode(pixels),
                models["vae"].encode(small))

    tb, high, base = encode(batch)
    return types.SimpleNamespace(models=models, tb=tb, high=high, base=base)


def frozen_models(cfg, path):
    from avatarv_jax.models import factory
    from avatarv_jax.training.checkpoints import restore_models
    models = factory.build_models(cfg, seed=0)
    restore_models(path, models, use_ema=False)
    return models


def test_sr_config_and_bad_batches():
    from avatarv_jax.training.sr_batch import check_sr_batch
    from avatarv_jax.training.sr_step import sr_scale_of
    cfg = config_for("sr", "", 1)
    assert sr_scale_of(cfg) == 2
    cfg.train.sample_every = 10
    with pytest.raises(ValueError, match="sample_every must be 0"):
        sr_scale_of(cfg)
    assert cfg.model.cond_channels == cfg.model.in_channels == 16
    assert cfg.model.gen_window == 2 and not cfg.model.guidance_embed
    assert cfg.data.resolution == 2 * 32 and cfg.inference.sr_steps == cfg.sampling.num_steps
    assert config_for("distill_sr", "", 1).inference.sr_steps == 1
    batch = sr_batch()
    with pytest.raises(ValueError, match="latent-mode"):
        check_sr_batch({"latents": 0, **{k: v for k, v in batch.items() if k != "video"}}, 2, 8)
    with pytest.raises(ValueError, match="multiples of 32"):
        check_sr_batch(dict(batch, video=batch["video"][:, :, :48, :48]), 2, 8)


def test_sr_batch_shapes_and_condition_equal_inference(encoded):
    """Targets at 64 px -> 8x8 latents; the condition is the 32-px clip's 4x4 latents upsampled
    to 8x8 exactly as ``Pipeline._refine`` upsamples the base model's latents."""
    from avatarv_jax.inference.pipeline import Pipeline
    tb, base = encoded.tb, encoded.base
    assert tb.latents.shape == (2, 2, 8, 8, 16)
    assert tb.cond_latents.shape == tb.latents.shape
    assert tb.ref_latents.shape == (2, 2, 8, 8, 16)
    assert tb.audio.shape == (2, 5, 32) and tb.ref_audio.shape == (2, 5, 32)
    assert tb.motion is None and tb.ref_motion is None and tb.face_mask.shape == (2, 5, 64, 64)

    assert base.shape == (2, 2, 4, 4, 16)
    np.testing.assert_allclose(np.asarray(tb.latents), np.asarray(encoded.high), atol=1e-5)
    # Inference's _refine on the same base latents: capture the condition it samples with.
    seen = {}

    def step(conds, x, prefix, cond, sigma, sigma_next):
        seen["cond"] = cond
        return x

    stub = types.SimpleNamespace(
        _sr_audio_cache=lambda sr, feats: None, settings=types.SimpleNamespace(prefix_latents=0),
        _noise=lambda seed, chunk, grid, stream: {"video": jnp.zeros((2, 2, *grid, 16))})
    sr = {"grid": (8, 8), "ref_cache": None, "sigmas": np.array([1.0, 0.0]), "step": step}
    Pipeline._refine(stub, sr, None, base, None, 0, None)
    np.testing.assert_allclose(np.asarray(tb.cond_latents), np.asarray(seen["cond"]), atol=1e-5)
    assert not np.allclose(np.asarray(tb.cond_latents), np.asarray(tb.latents), atol=1e-2)


def test_sr_starts_from_sft_by_surgery_and_lowers_the_loss(runs, encoded):
    """Surgery from the tiny SFT checkpoint adds exactly the zero-initialised condition
    embedding; six updates on one batch lower the flow loss (mean over 8 fixed noise draws) by
    > 10 %."""
    from avatarv_jax.diffusion.guidance import ConditionDropout
    from avatarv_jax.diffusion.objective import flow_matching_loss
    from avatarv_jax.training.step import ModuleTemplate, module_params
    from avatarv_jax.training.surgery import transplant

    text = "\n".join(runs.logs)
    assert "new (zero init): cond_embedding/kernel" in text, text
    assert "1 new, 0 dropped" in text, text
    assert runs.sr["step"] == SR_STEPS and runs.sr["stopped"] == "done"

    cfg = config_for("sr", SFT_TINY, 1)
    models, tb = encoded.models, encoded.tb
    sft = ocp.StandardCheckpointer().restore(resolve_step_dir(SFT_TINY) / "ema")
    start, _ = transplant(sft, module_params(models["dit"]))
    template = ModuleTemplate(models["dit"])
    no_drop = ConditionDropout(p_text=0.0, p_audio=0.0, p_ref=0.0, p_all=0.0)

    @jax.jit
    def loss(params):
        keys = jax.random.split(jax.random.key(3), 8)
        return jnp.mean(jax.lax.map(lambda k: flow_matching_loss(
            template.merge(params), tb, k, flow_cfg=cfg.flow, dropout=no_drop,
            num_prefix=1)[0], keys))

    before = float(loss(start))
    after = float(loss(runs.sr["state"].params))
    assert np.isfinite(before) and after < 0.9 * before, (before, after)


def check_loads(out, name, state, steps):
    """``_load_sr`` of the work directory: the refiner of its config, its EMA bit for bit."""
    from avatarv_jax.config import get_model_config
    from avatarv_jax.inference.pipeline import _load_sr
    from avatarv_jax.training.step import module_params
    from avatarv_jax.training.surgery import _flat

    dit, info, sr_steps = _load_sr(get_model_config("tiny"), out / name, lambda m: None)
    assert info.kind == "trainer" and sr_steps == steps, (name, info, sr_steps)
    assert dit.cfg.cond_channels == 16 and dit.cfg.gen_window == 2
    loaded, saved = _flat(module_params(dit)), _flat(jax.device_get(state.ema))
    assert set(loaded) == set(saved)
    for k in saved:
        np.testing.assert_array_equal(np.asarray(loaded[k]), np.asarray(saved[k]), k)


def test_inference_loads_the_sr_checkpoint(runs):
    """``--sr-checkpoint WORKDIR`` builds the refiner from the work directory's config,
    restores its EMA weights and samples in its ``inference.sr_steps``; a base checkpoint and a
    refiner of another scale are refused."""
    from avatarv_jax.config import get_model_config
    from avatarv_jax.inference.errors import InferenceInputError
    from avatarv_jax.inference.pipeline import _load_sr

    check_loads(runs.out, "sr", runs.sr["state"], 4)
    base_cfg = get_model_config("tiny")
    with pytest.raises(InferenceInputError, match="not an SR refiner"):
        _load_sr(base_cfg, SFT_TINY, lambda m: None)
    other = get_model_config("tiny")
    other.inference.sr_scale = 4
    with pytest.raises(InferenceInputError, match="trained for sr_scale 2"):
        _load_sr(other, runs.out / "sr", lambda m: None)


@pytest.mark.slow
def test_distill_sr_moves_the_one_step_student_toward_the_teacher(distilled):
    """The frozen teacher is the sr run's EMA; after DISTILL_STEPS DMD updates the student's
    1-step sample is closer (RMS, each of 2 noise draws) to the teacher's 4-step sample from
    the same noise than the teacher's own 1-step sample (the student's start) is; inference
    loads the distilled refiner with 1 step."""
    runs = distilled
    check_loads(runs.out, "distill_sr", runs.dsr["state"], 1)
    from avatarv_jax.diffusion.samplers import sigma_schedule
    from avatarv_jax.posttrain.sr_stages import sample_sr
    from avatarv_jax.posttrain.stages import _normal_like, split_conditions
    from avatarv_jax.training.sr_batch import encode_sr_batch
    from avatarv_jax.training.step import ModuleTemplate
    from avatarv_jax.training.surgery import _flat

    assert runs.dsr["step"] == DISTILL_STEPS and runs.dsr["stopped"] == "done"
    step_dir = resolve_step_dir(runs.out / "distill_sr")
    teacher = ocp.StandardCheckpointer().restore(step_dir / "frozen")["teacher"]
    sr_ema = ocp.StandardCheckpointer().restore(resolve_step_dir(runs.out / "sr") / "ema")
    for k, v in _flat(sr_ema).items():
        np.testing.assert_array_equal(np.asarray(_flat(teacher)[k]), np.asarray(v), k)

    cfg = config_for("distill_sr", "", 1)
    models = frozen_models(cfg, runs.out / "distill_sr")
    template = ModuleTemplate(models["dit"])
    tb = jax.jit(lambda b: encode_sr_batch(models, b, 2))(numeric(sr_batch()))
    cond = split_conditions(tb, 1)

    @jax.jit
    def distances(teacher, student):
        def one_noise(k):
            z = _normal_like(k, cond.x0)
            target = sample_sr(template, teacher, cond, z, sigma_schedule(4))["video"]
            return jnp.stack([jnp.sqrt(jnp.mean((sample_sr(
                template, p, cond, z, sigma_schedule(1))["video"] - target) ** 2))
                for p in (teacher, student)])
        return jax.lax.map(one_noise, jax.random.split(jax.random.key(7), 2))

    d = np.asarray(distances(teacher, runs.dsr["state"].params))
    print("distill_sr paired RMS to the teacher's 4-step sample (start, end):", d.tolist())
    assert np.all(np.isfinite(d)) and np.all(d[:, 1] < d[:, 0]), d


# -- exact resume after SIGTERM (two processes, like tests/test_posttrain_resume.py) ---------

CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from avatarv_jax.training.trainer import train
    from tests.test_sr_stage import SFT_TINY, config_for, data

    out, mode = sys.argv[1:3]
    n = 3
    for stage, start in (("sr", SFT_TINY), ("distill_sr", f"{{out}}/sr_a")):
        cfg = lambda: config_for(stage, start, n)
        if mode == "resume":
            r = train(cfg(), f"{{out}}/{{stage}}_b", data=data(n))
            print("RESUMED", stage, r["step"], r["stopped"], flush=True)
            continue
        a = train(cfg(), f"{{out}}/{{stage}}_a", data=data(n))
        b = train(cfg(), f"{{out}}/{{stage}}_b", data=data(n, kill_at=1))
        print("RESULT", stage, a["step"], a["stopped"], b["step"], b["stopped"], flush=True)
""")


def _run(mode, out):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(out / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    proc = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT), str(out), mode],
                          env=env, capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {line.split()[1]: line.split()[2:] for line in proc.stdout.splitlines()
            if line.startswith(("RESULT", "RESUMED"))}


@pytest.mark.slow
def test_sr_stages_resume_exactly_after_sigterm(tmp_path):
    results, resumed = _run("run", tmp_path), _run("resume", tmp_path)
    for stage in ("sr", "distill_sr"):
        a_step, a_stop, b_step, b_stop = results[stage]
        assert (int(a_step), a_stop) == (3, "done") and b_stop == "sigterm", results[stage]
        assert 1 <= int(b_step) < 3 and resumed[stage] == ["3", "done"], stage
        dirs = [resolve_step_dir(tmp_path / f"{stage}_{x}") for x in "ab"]
        items = [p.name for p in dirs[0].iterdir()
                 if p.name in ("params", "ema", "opt_state", "aux", "frozen")]
        assert ("aux" in items) == (stage == "distill_sr")
        for item in items:
            a, b = (jax.tree.leaves(ocp.StandardCheckpointer().restore(d / item)) for d in dirs)
            assert len(a) == len(b) > 0
            for x, y in zip(a, b):
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y), f"{stage} {item}")
