"""Sharding: every parameter is named, and a sharded forward+backward equals one device."""

import os
import subprocess
import sys
import textwrap

from flax import nnx

from avatarv_jax.config import DEFAULT_LOGICAL_AXIS_RULES, get_model_config
from avatarv_jax.models import factory
from avatarv_jax.models.audio_encoder import AudioEncoder
from avatarv_jax.models.text_encoder import T5Encoder
from avatarv_jax.models.vae import CausalVideoVAE
from avatarv_jax.models.dit import DiT
from avatarv_jax.parallel.sharding import logical_to_mesh_spec, unnamed_parameters
from avatarv_jax.testing import tiny_dit_config
from jax.sharding import PartitionSpec as P


def test_every_parameter_has_logical_axes():
    cfg = tiny_dit_config(cond_channels=16)
    abstract = nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0)))
    assert unnamed_parameters(nnx.state(abstract, nnx.Param)) == []
    model_cfg = get_model_config("tiny")
    for name, build in [
            ("text", lambda: T5Encoder(factory.text_encoder_config(model_cfg), nnx.Rngs(0))),
            ("audio", lambda: AudioEncoder(factory.audio_encoder_config(model_cfg), nnx.Rngs(0))),
            ("vae", lambda: CausalVideoVAE(factory.vae_config(model_cfg), rngs=nnx.Rngs(0)))]:
        assert unnamed_parameters(nnx.state(nnx.eval_shape(build), nnx.Param)) == [], name


def test_logical_to_mesh_spec_rules():
    rules = DEFAULT_LOGICAL_AXIS_RULES
    assert logical_to_mesh_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")
    assert logical_to_mesh_spec(("layers", "embed", "heads"), rules) == P(None, "fsdp", "tensor")
    # A mesh axis is used once per spec.
    assert logical_to_mesh_spec(("mlp", "heads"), rules) == P("tensor", None)
    assert logical_to_mesh_spec(("activation_batch", None), rules) == P(("data", "fsdp"), None)


SHARDED_STEP = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from avatarv_jax.config import DEFAULT_LOGICAL_AXIS_RULES as RULES
    from avatarv_jax.models.dit import DiT
    from avatarv_jax.parallel.mesh import make_mesh
    from avatarv_jax.parallel.sharding import state_shardings, use_rules
    from avatarv_jax.testing import perturb_zero_init, random_inputs, tiny_dit_config

    assert jax.device_count() == 8, jax.devices()
    cfg = tiny_dit_config()
    graphdef, state = nnx.split(perturb_zero_init(DiT(cfg, rngs=nnx.Rngs(0))))
    gen, ref = random_inputs(cfg, batch=4, gen_frames=2, ref_frames=2, size=(4, 4))

    def loss_fn(state, gen, ref):
        out = nnx.merge(graphdef, state)(gen, ref)
        return jnp.mean(out["video"] ** 2) + jnp.mean(out["motion"] ** 2)

    step = jax.value_and_grad(loss_fn)
    loss1, grads1 = jax.jit(step)(state, gen, ref)

    mesh = make_mesh(dict(data=2, fsdp=2, tensor=2))
    shardings = state_shardings(state, mesh, RULES)
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    sharded_state = jax.device_put(state, shardings)
    spec = sharded_state["blocks"]["ffn_in"]["kernel"][...].sharding.spec
    assert spec == P(None, "fsdp", "tensor"), spec
    with use_rules(mesh, RULES):
        f = jax.jit(step, in_shardings=(shardings, batch, batch),
                    out_shardings=(NamedSharding(mesh, P()), shardings))
        loss2, grads2 = f(sharded_state, jax.device_put(gen, batch), jax.device_put(ref, batch))
    assert abs(float(loss1) - float(loss2)) <= 1e-5, (loss1, loss2)
    worst = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()),
                                             grads1, grads2)))
    assert worst <= 1e-5, worst
    print("OK", float(loss1), worst)
""")


def test_sharded_forward_backward_matches_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SHARDED_STEP], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr[-3000:]
