"""The Pallas SRA kernel inside shard_map (batch and heads split over 8 simulated devices).

This is the layout of the sequence-parallel path: Ulysses all-to-all turns sequence shards
into head shards around attention, so each device runs the kernel on whole sequences.
"""

import os
import subprocess
import sys
import textwrap

SHARDED_SRA = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from avatarv_jax.kernels.sra_layout import SRALayout
    from avatarv_jax.kernels.sra_pallas import BlockSizes, sra_pallas
    from avatarv_jax.kernels.sra_reference import sra_reference

    assert jax.device_count() == 8, jax.devices()
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "heads"))
    layout = SRALayout(5, 3, 5, ref_window=1, gen_window=-1)
    keys = jax.random.split(jax.random.key(0), 6)
    lens = [layout.ref_len] * 3 + [layout.gen_len] * 3
    args = [jax.random.normal(k, (2, n, 4, 64)) for k, n in zip(keys, lens)]
    valid = jnp.array([5, 2])
    blocks = BlockSizes(16, 16, 16, 16)

    def loss(impl, *a):
        (o_ref, o_gen), (l_ref, l_gen) = impl(*a)
        return jnp.sum(o_ref ** 2) + jnp.sum(jnp.sin(o_gen)) + jnp.sum(l_gen), (o_ref, o_gen)

    def local(q_ref, k_ref, v_ref, q_gen, k_gen, v_gen, valid):
        return sra_pallas(q_ref, k_ref, v_ref, q_gen, k_gen, v_gen, layout=layout,
                          ref_valid_frames=valid, return_lse=True, block_sizes=blocks)

    x, lse = P("data", None, "heads", None), P("data", "heads", None)
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(x,) * 6 + (P("data"),),
                            out_specs=((x, x), (lse, lse)), check_vma=False)
    step = lambda impl: jax.jit(jax.value_and_grad(lambda *a: loss(impl, *a, valid),
                                                   argnums=tuple(range(6)), has_aux=True))
    reference = lambda *a: sra_reference(*a[:6], layout=layout, ref_valid_frames=a[6],
                                         return_lse=True)
    (l1, out1), g1 = step(lambda *a: sharded(*a))(*args)
    (l2, out2), g2 = step(reference)(*args)
    worst = max(float(jnp.abs(a - b).max()) for a, b in zip(out1 + g1, out2 + g2))
    assert worst <= 1e-5 and abs(float(l1 - l2)) <= 1e-3, (worst, l1, l2)
    print("OK", worst)
""")


def test_kernel_inside_shard_map_matches_reference():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SHARDED_SRA], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr[-3000:]
