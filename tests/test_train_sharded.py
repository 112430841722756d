"""The train step on 8 simulated devices: (data 2, fsdp 2, tensor 2) and (data 2, sequence 4,
Ulysses) equal one device within 1e-5; a checkpoint saved on one mesh restores onto another."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np, jax, jax.numpy as jnp
    from avatarv_jax.models import factory
    from avatarv_jax.parallel.mesh import make_mesh
    from avatarv_jax.training.checkpoints import TrainCheckpointer
    from avatarv_jax.training.optimizer import make_optimizer
    from avatarv_jax.training.stage_config import stage_config
    from avatarv_jax.training.state import create_train_state
    from avatarv_jax.training.step import ModuleTemplate, TrainStepBuilder, module_params
    from avatarv_jax.training.synthetic import synthetic_batch, synthetic_dataset

    assert jax.device_count() == 8, jax.devices()
    workdir = sys.argv[1]
    stage = "a2v"     # REF + GEN + audio: every stream the step shards
    cfg = stage_config(stage, "tiny")
    cfg.optimizer.warmup_steps = 0
    models = factory.build_models(cfg)
    dit_t = ModuleTemplate(models["dit"])
    frozen_t = {k: ModuleTemplate(models[k]) for k in ("text_encoder", "audio_encoder", "vae")}
    tx, schedule = make_optimizer(cfg.optimizer, dit_t.logical_axes(), 10)
    key = jax.random.key(1)
    # Zero-initialised outputs get random values so every parameter has a gradient.
    params = jax.tree.map(lambda x: x if jnp.any(x) else 0.05 * jax.random.normal(key, x.shape),
                          module_params(models["dit"]))
    frozen = {k: module_params(models[k]) for k in frozen_t}
    # Latents 8x8 -> 16 tokens per frame: REF 16 and GEN 32 tokens split over sequence=4.
    batch = synthetic_batch(0, stage, batch_size=4, num_frames=5, ref_frames=1, resolution=64,
                            text_len=8, latent_shape=(8, 8, 16))

    def builder(mesh_shape, devices):
        mesh = make_mesh(mesh_shape, devices)
        return TrainStepBuilder(dit=dit_t, frozen=frozen_t, tx=tx, schedule=schedule, cfg=cfg,
                                stage=stage, mesh=mesh)

    def one_step(b):
        shardings = b.state_shardings(jax.eval_shape(
            lambda: create_train_state(params, tx, use_ema=True)))
        state = jax.jit(lambda p: create_train_state(p, tx, use_ema=True),
                        out_shardings=shardings)(params)
        fz = jax.device_put(frozen, b.frozen_shardings())
        device_batch = b.put_batch(batch)
        state, metrics = b.compile(state, device_batch)(state, fz, device_batch)
        return state, fz, metrics

    ref_state, _, ref_metrics = one_step(builder(dict(data=1), jax.devices()[:1]))
    ref_state = jax.device_get(ref_state)
    states = {}
    for name, shape in (("dft", dict(data=2, fsdp=2, tensor=2)), ("ulysses", dict(data=2, sequence=4))):
        b = builder(shape, jax.devices())
        state, fz, metrics = one_step(b)
        states[name] = (b, state, fz)
        dloss = abs(float(metrics["loss"]) - float(ref_metrics["loss"]))
        worst = max(jax.tree.leaves(jax.tree.map(
            lambda a, r: float(np.abs(np.asarray(a) - r).max()), state.params, ref_state.params)))
        print(name, "loss diff", dloss, "param diff", worst)
        assert dloss <= 1e-5 and worst <= 1e-5, (name, dloss, worst)
    spec = states["dft"][1].params["blocks"]["ffn_in"]["kernel"].sharding.spec
    assert tuple(spec) == (None, "fsdp", "tensor"), spec

    # Save on (data 2, fsdp 2, tensor 2) with a Grain iterator two batches in; restore onto
    # (data 2, sequence 4) and onto one device.
    b_from, state, fz = states["dft"]
    data = iter(synthetic_dataset(stage, num_batches=4, batch_size=1, num_frames=5,
                                  ref_frames=1, resolution=32, text_len=4))
    next(data); next(data)
    ckpt = TrainCheckpointer(workdir, every_steps=1, keep=2)
    ckpt.save(state, fz, data, stage=stage, force=True)
    ckpt.close()
    saved = jax.device_get(state)
    for name, b_to in (("ulysses", states["ulysses"][0]), ("one", builder(dict(data=1), jax.devices()[:1]))):
        target = b_to.abstract_state()
        abstract_frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), fz)
        fresh = iter(synthetic_dataset(stage, num_batches=4, batch_size=1, num_frames=5,
                                       ref_frames=1, resolution=32, text_len=4))
        restored, rfz, meta = TrainCheckpointer(workdir, every_steps=1, keep=2).restore(
            target, abstract_frozen, fresh)
        assert meta["step"] == 1 and int(restored.step) == 1
        for tree_a, tree_b in ((restored.params, saved.params), (restored.opt_state, saved.opt_state),
                               (restored.ema, saved.ema)):
            for x, y in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)):
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        got = jax.tree.leaves(jax.tree.map(lambda x: x.sharding, restored.params))
        want = jax.tree.leaves(b_to.param_shardings())
        assert all(g.is_equivalent_to(w, 3) for g, w in zip(got, want)), name
        np.testing.assert_array_equal(next(fresh)["text_ids"], synthetic_batch(
            2, stage, batch_size=1, num_frames=5, ref_frames=1, resolution=32, text_len=4)["text_ids"])
    print("OK")
""")


def test_sharded_steps_and_restore_onto_another_mesh(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "ckpt")], env=env,
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
