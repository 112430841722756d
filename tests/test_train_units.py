"""Trainer pieces: optimizer groups and schedule, parameter surgery, NaN guard, restore_models,
FLOP formula."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from avatarv_jax.models.dit import DiT
from avatarv_jax.testing import tiny_dit_config
from avatarv_jax.training.checkpoints import CheckpointMismatchError, restore_models
from avatarv_jax.training.guard import NonFiniteLossError, check_bad_steps
from avatarv_jax.training.metrics import dit_forward_flops, throughput
from avatarv_jax.training.optimizer import learning_rate_schedule, optimizer_groups
from avatarv_jax.training.stage_config import stage_config
from avatarv_jax.training.step import ModuleTemplate, module_params
from avatarv_jax.training.surgery import transplant


def _dit(**overrides):
    return DiT(tiny_dit_config(**overrides), rngs=nnx.Rngs(0))


def test_optimizer_groups_muon_for_hidden_matrices_only():
    groups = optimizer_groups(ModuleTemplate(_dit()).logical_axes())
    muon, adamw = set(groups["muon"]), set(groups["adamw"])
    for name in ("blocks/attn1/to_q/kernel", "blocks/ffn_in/kernel", "blocks/ffn_out/kernel",
                 "blocks/attn_audio/to_out/kernel", "time_proj/kernel"):
        assert name in muon, name
    for name in ("patch_embedding/kernel", "proj_out/kernel", "audio_proj/kernel",
                 "blocks/attn1/to_q/bias", "blocks/norm2/scale", "scale_shift_table",
                 "ref_embedding", "audio_pos", "text_embedder/linear_1/kernel"):
        assert name in adamw, name
    assert not muon & adamw


def test_schedule_warmup_then_cosine():
    cfg = stage_config("t2v", "tiny").optimizer
    cfg.learning_rate, cfg.warmup_steps, cfg.final_lr_ratio = 1e-3, 10, 0.1
    lr = learning_rate_schedule(cfg, 110)
    np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(60), lr(110)],
                               [0.0, 5e-4, 1e-3, 1e-3 * (0.1 + 0.9 * 0.5), 1e-4], rtol=1e-5)


def test_surgery_t2v_to_a2v_to_sft_keeps_carried_weights_bit_identical():
    t2v = module_params(_dit(audio_dim=0, motion_dim=0))
    t2v = jax.tree.map(lambda x: x + 0.123, t2v)          # "trained": differs from any init
    a2v_fresh = module_params(_dit(motion_dim=0))
    a2v, report = transplant(t2v, a2v_fresh)
    flat = lambda t: {jax.tree_util.keystr(p): x for p, x in
                      jax.tree_util.tree_flatten_with_path(t)[0]}
    old, new, fresh = flat(t2v), flat(a2v), flat(a2v_fresh)
    assert set(new) == set(fresh)
    for k, x in old.items():
        np.testing.assert_array_equal(np.asarray(new[k]), np.asarray(x), err_msg=k)
    assert len(report.carried) == len(old) and not report.dropped
    assert "blocks/attn_audio/to_out/kernel" in report.zero_init
    assert "audio_proj/kernel" in report.new and "audio_proj/kernel" not in report.zero_init
    assert any("attn_audio/to_out/kernel" in line and "zero" in line for line in report.lines())
    for k in set(new) - set(old):
        np.testing.assert_array_equal(np.asarray(new[k]), np.asarray(fresh[k]))

    sft, report = transplant(a2v, module_params(_dit()))
    assert {"motion_head/proj/kernel", "motion_encoder/fc_in/kernel"} <= set(report.new) | {
        "motion_encoder/fc_in/kernel"}
    assert "motion_head/proj/kernel" in report.zero_init
    for k, x in flat(a2v).items():
        np.testing.assert_array_equal(np.asarray(flat(sft)[k]), np.asarray(x))


def test_surgery_rejects_changed_shapes_and_dropped_modules():
    small = module_params(_dit(audio_dim=0, motion_dim=0))
    with pytest.raises(ValueError, match="changed shape.*patch_embedding"):
        transplant(small, module_params(_dit(audio_dim=0, motion_dim=0, in_channels=8)))
    with pytest.raises(ValueError, match="no place for.*audio"):
        transplant(module_params(_dit(motion_dim=0)), small)


def test_init_from_with_other_encoder_presets_names_the_flag(tmp_path):
    from avatarv_jax.training.trainer import check_same_encoders

    work = tmp_path / "previous"
    (work / "checkpoints" / "7" / "params").mkdir(parents=True)
    cfg = stage_config("sft", "tiny")
    previous = json.loads(cfg.to_json())
    (work / "config.json").write_text(json.dumps(previous))
    check_same_encoders(cfg, str(work))                      # same presets: fine
    check_same_encoders(cfg, str(work / "checkpoints" / "7"))
    previous["vae"] = "tiny_s4"
    (work / "config.json").write_text(json.dumps(previous))
    for path in (work, work / "checkpoints" / "7"):
        with pytest.raises(ValueError, match="vae='tiny_s4' \\(this run: 'tiny'\\); pass "
                                             "--config.vae=tiny_s4"):
            check_same_encoders(cfg, str(path))


def test_guard_host_side():
    assert check_bad_steps(0, step=3, limit=2, metrics={}) is False
    assert check_bad_steps(1, step=3, limit=2, metrics={}) is True
    with pytest.raises(NonFiniteLossError, match="2 steps in a row.*max_bad_steps"):
        check_bad_steps(2, step=4, limit=2, metrics={"loss": float("nan")})


@pytest.fixture(scope="module")
def guarded_run(tmp_path_factory):
    """t2v on latents; batch 1 is poisoned (NaN), 2 fine, 3 and 4 poisoned: the guard skips
    step 2 and the run goes on, then stops at step 5 (two bad in a row)."""
    import grain
    from avatarv_jax.training.synthetic import synthetic_batch
    from avatarv_jax.training.trainer import train

    def batch(i):
        b = synthetic_batch(int(i), "t2v", batch_size=2, num_frames=5, ref_frames=1,
                            resolution=32, text_len=8, latent_shape=(4, 4, 16))
        if i in (1, 3, 4):
            b["latents"][0, 0, 0, 0, 0] = np.nan
        return b

    cfg = stage_config("t2v", "tiny")
    cfg.train.update(num_steps=6, log_every=100, max_bad_steps=2, progress_bar=False,
                     sample_every=3, sample_steps=2)
    cfg.checkpoint.update(every_steps=1, keep=10, async_save=False)
    cfg.optimizer.warmup_steps = 0
    workdir = tmp_path_factory.mktemp("guard")
    data = grain.MapDataset.range(6).map(batch).to_iter_dataset()
    with pytest.raises(NonFiniteLossError, match="stopping at step 5: 2 steps in a row"):
        train(cfg, workdir, data=data)
    return cfg, workdir


def _load(workdir, step, item="params"):
    import orbax.checkpoint as ocp
    return ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / item)


def test_nan_guard_skips_poisoned_batch_and_continues(guarded_run):
    _, workdir = guarded_run
    records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["finite"]) for r in records] == [(2, 0.0), (4, 0.0), (5, 0.0)]
    p1, p2, p3 = (_load(workdir, s) for s in (1, 2, 3))
    same = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), p1, p2))
    assert all(same)                                   # the poisoned step changed nothing
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), p2, p3))
    assert any(changed)                                # the next good step trained
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(p3))


def test_sample_video_written(guarded_run):
    import av
    _, workdir = guarded_run
    path = workdir / "samples" / "step_00000003.mp4"
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (32, 32, 3)
    assert np.std(np.stack(frames).astype(np.float32)) > 1.0     # not a blank video


def test_restore_models_round_trip_and_mismatch(guarded_run):
    from avatarv_jax.models import factory
    cfg, workdir = guarded_run
    models = factory.build_models(cfg, seed=1)
    step = restore_models(workdir / "checkpoints" / "3", models, use_ema=False)
    assert step == 3
    saved = _load(workdir, 3)
    got = module_params(models["dit"])
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    frozen = _load(workdir, 3, "frozen")
    np.testing.assert_array_equal(
        np.asarray(jax.tree.leaves(frozen["vae"])[0]),
        np.asarray(jax.tree.leaves(module_params(models["vae"]))[0]))
    # EMA by default, from the workdir's latest step.
    assert restore_models(workdir, {"dit": models["dit"]}) == max(
        int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    a2v_dit = _dit(motion_dim=0)
    with pytest.raises(CheckpointMismatchError, match="audio_pos: missing from the checkpoint"):
        restore_models(workdir, {"dit": a2v_dit})
    with pytest.raises(CheckpointMismatchError, match="patch_embedding/kernel: checkpoint shape"):
        restore_models(workdir, {"dit": _dit(audio_dim=0, motion_dim=0, in_channels=8)})


def test_flop_formula_matches_xla_cost_analysis():
    """The explicit formula counts the matmuls; XLA counts every op. With wide layers the
    matmuls dominate and the two agree within a few percent."""
    cfg = tiny_dit_config(dim=256, ffn_dim=1024, num_layers=1, num_heads=4, audio_dim=0,
                          motion_dim=0, text_dim=32)
    model = nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0)))
    from avatarv_jax.models.dit import GenInputs, RefInputs
    b, f, fr, h, l = 2, 3, 2, 8, 8
    gen = GenInputs(latents=jnp.zeros((b, f, h, h, 16)), timesteps=jnp.zeros((b, f)),
                    text=jnp.zeros((b, l, 32)))
    ref = RefInputs(latents=jnp.zeros((b, fr, h, h, 16)))
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, g, r: nnx.merge(graphdef, s)(g, r))
    xla = fwd.lower(state, gen, ref).cost_analysis()["flops"]
    ours = dit_forward_flops(cfg, batch=b, gen_frames=f, ref_frames=fr, grid=(h // 2, h // 2),
                             text_len=l, motion=False, audio=False)
    assert 0.8 < ours / xla < 1.05, (ours, xla)


def test_throughput_mfu():
    out = throughput(2e12, 0.5, examples=8, num_devices=2, peak_tflops_per_device=4.0)
    assert out == pytest.approx({"examples_per_s": 16.0, "tflops_per_device": 2.0, "mfu": 0.5})
    assert "mfu" not in throughput(1e12, 1.0, examples=1, num_devices=1,
                                   peak_tflops_per_device=None)
