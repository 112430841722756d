"""SRA as dense library attention calls (``attention_impl="cudnn"``) and the "attention" remat
policy.

On CPU the composition runs JAX's XLA attention path, which checks the split of the SRA rule
(per-frame REF rows, GEN rows over ``[GEN | REF]`` with padded invalid REF frames) against the
dense-mask reference, forward and gradients. On a GPU the same tests run cuDNN in bf16.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from avatarv_jax.kernels.sra_layout import SRALayout
from avatarv_jax.kernels.sra_reference import sra_reference
from avatarv_jax.layers.attention import get_attention_impl
from avatarv_jax.models.dit import DiT
from avatarv_jax.testing import (attention_impl_errors, perturb_zero_init, random_inputs,
                                 tiny_dit_config)

ON_GPU = jax.default_backend() == "gpu"
DTYPES = [jnp.bfloat16] if ON_GPU else [jnp.float32, jnp.bfloat16]


def _inputs(layout, batch, heads, dim, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 6)
    lens = [layout.ref_len] * 3 + [layout.gen_len] * 3
    return [jax.random.normal(k, (batch, n, heads, dim)).astype(dtype)
            for k, n in zip(keys, lens)]


def _value_and_grad(impl, layout, args, valid):
    def loss(*a):
        o_ref, o_gen = impl(*a, layout=layout, ref_valid_frames=valid)
        outs = [o.astype(jnp.float32) for o in (o_ref, o_gen) if o is not None]
        w = [jnp.sin(jnp.arange(o.size, dtype=jnp.float32).reshape(o.shape)) for o in outs]
        return sum(jnp.sum(o * c) + jnp.sum(o ** 2) for o, c in zip(outs, w)), (o_ref, o_gen)
    argnums = tuple(i for i, a in enumerate(args) if a is not None)
    return jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))(*args)


def _close(got, want, dtype, what):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    if not got.size:
        return
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-6)
    assert err <= (1e-5 if dtype == jnp.float32 else 2e-2), f"{what}: relative error {err}"


# (ref_frames, gen_frames, tokens_per_frame, ref_window, valid_frames)
CASES = [
    (3, 2, 5, 0, None),
    (4, 3, 6, 0, (4, 1)),
    (3, 2, 8, -1, (2, 0)),
    (0, 3, 5, 0, None),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ref_frames,gen_frames,t,ref_window,valid", CASES)
def test_outputs_and_grads_match_reference(ref_frames, gen_frames, t, ref_window, valid, dtype):
    layout = SRALayout(ref_frames, gen_frames, t, ref_window=ref_window)
    args = _inputs(layout, 2, 2, 64, dtype)
    valid = None if valid is None else jnp.array(valid)
    (_, want), want_g = _value_and_grad(sra_reference, layout,
                                        [a.astype(jnp.float32) for a in args], valid)
    (_, got), got_g = _value_and_grad(get_attention_impl("cudnn"), layout, args, valid)
    for name, g, w in zip(("o_ref", "o_gen"), got, want):
        assert g.dtype == dtype
        _close(g, w, dtype, name)
    names = ("dq_ref", "dk_ref", "dv_ref", "dq_gen", "dk_gen", "dv_gen")
    for name, g, w in zip(names, got_g, want_g):
        _close(g, w, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cached_gen_rows_and_reference_rows_alone(dtype):
    layout = SRALayout(3, 2, 5)
    q_ref, k_ref, v_ref, q_gen, k_gen, v_gen = _inputs(layout, 2, 2, 64, dtype, seed=1)
    impl = get_attention_impl("cudnn")
    f32 = [x.astype(jnp.float32) for x in (q_ref, k_ref, v_ref, q_gen, k_gen, v_gen)]
    _, want_gen = sra_reference(None, *f32[1:3], *f32[3:], layout=layout,
                                ref_valid_frames=jnp.array([1, 3]))
    o_ref, got_gen = impl(None, k_ref, v_ref, q_gen, k_gen, v_gen, layout=layout,
                          ref_valid_frames=jnp.array([1, 3]))
    assert o_ref is None
    _close(got_gen, want_gen, dtype, "cached o_gen")
    ref_only = SRALayout(3, 0, 5)
    want_ref, _ = sra_reference(*f32[:3], None, None, None, layout=ref_only)
    got_ref, o_gen = impl(q_ref, k_ref, v_ref, None, None, None, layout=ref_only)
    assert o_gen is None
    _close(got_ref, want_ref, dtype, "REF-only o_ref")


def test_layouts_it_cannot_compose_are_refused():
    impl = get_attention_impl("cudnn")
    windowed = SRALayout(2, 3, 4, gen_window=1)
    with pytest.raises(ValueError, match="gen_window=-1 only.*pallas"):
        impl(*_inputs(windowed, 1, 1, 8, jnp.float32), layout=windowed)
    ref_windowed = SRALayout(3, 2, 4, ref_window=1)
    with pytest.raises(ValueError, match="ref_window 0 or -1 only"):
        impl(*_inputs(ref_windowed, 1, 1, 8, jnp.float32), layout=ref_windowed)
    with pytest.raises(ValueError, match="bfloat16 or float16.*float32"):
        layout = SRALayout(1, 1, 4)
        impl(*_inputs(layout, 1, 1, 8, jnp.float32), layout=layout, implementation="cudnn")


def test_dit_cudnn_equals_xla_outputs_and_grads():
    cfg = tiny_dit_config(num_layers=1, dtype="bfloat16" if ON_GPU else "float32")
    outputs, worst_grad = attention_impl_errors(cfg, "cudnn")
    for key, (_, rel_err) in outputs.items():
        assert rel_err <= (3e-2 if ON_GPU else 2e-5), (key, rel_err)
    assert worst_grad <= (5e-2 if ON_GPU else 1e-4), worst_grad


def _count(jaxpr, name):
    """Equations of primitive ``name`` in a jaxpr, sub-jaxprs (scan, remat, jit) included."""
    total = 0
    for eqn in jaxpr.eqns:
        total += eqn.primitive.name == name
        for param in eqn.params.values():
            for inner in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(inner, "jaxpr", inner)      # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    total += _count(inner, name)
    return total


def test_attention_remat_skips_the_recomputed_attention_forward():
    """Full remat runs the Pallas forward kernels again in the backward; "attention" keeps their
    outputs, so only the dQ/dKV kernels run there, and the gradients are those of full remat."""
    base = tiny_dit_config(num_layers=2, attention_impl="pallas")
    gen, ref = random_inputs(base, batch=1, gen_frames=2, ref_frames=2, size=(4, 4))
    results = {}
    for policy in ("full", "attention"):
        model = perturb_zero_init(DiT(dataclasses.replace(base, remat_policy=policy),
                                      rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(model)

        def loss(state, graphdef=graphdef):
            out = nnx.merge(graphdef, state)(gen, ref)
            return jnp.mean(out["video"] ** 2) + jnp.mean(out["motion"] ** 2)

        grad_fn = jax.grad(loss)
        kernels = _count(jax.make_jaxpr(grad_fn)(state).jaxpr, "pallas_call")
        results[policy] = (kernels, jax.jit(grad_fn)(state))
    forward_only = _count(jax.make_jaxpr(loss)(state).jaxpr, "pallas_call")
    assert forward_only == 2        # one forward kernel per query segment (REF, GEN)
    # full: forward 2 + recomputed forward 2 + dQ 2 + dK/dV 2 (REF keys, GEN keys) = 8
    assert results["full"][0] == 8, results["full"][0]
    assert results["attention"][0] == 6, results["attention"][0]
    worst = max(jax.tree.leaves(jax.tree.map(
        lambda a, b: float(jnp.abs(a - b).max() / (jnp.abs(b).max() + 1e-6)),
        results["attention"][1], results["full"][1])))
    # The recomputed forward is fused differently; a GPU multiplies fp32 in TF32.
    assert worst <= (5e-4 if ON_GPU else 1e-5), worst
