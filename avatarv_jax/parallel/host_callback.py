"""Host functions inside a sharded jitted step, one call per batch shard.

A plain ``jax.pure_callback`` on a batch-sharded array gathers the whole batch onto one
device and runs the host function once, on the process that owns that device: on several
hosts, host 0 scores every sample while the others wait, and every sample's frames travel to
it. Inside ``use_rules`` (the trainer's step), ``per_shard_callback`` instead maps the callback
over the batch shards with ``shard_map``, so each process runs it on its own samples, in
parallel, and nothing crosses hosts. Outside a mesh, or when the batch is not sharded, it is
the plain callback.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from avatarv_jax.parallel.sharding import active_mesh_and_rules, logical_to_mesh_spec


def batch_shard_axes(batch_size: int) -> tuple[str, ...]:
    """Mesh axes that split a batch of ``batch_size`` in the active ``use_rules`` context."""
    ctx = active_mesh_and_rules()
    if ctx is None:
        return ()
    mesh, rules = ctx
    spec = logical_to_mesh_spec(("activation_batch",), rules, (batch_size,), mesh)[0]
    if spec is None:
        return ()
    return (spec,) if isinstance(spec, str) else tuple(spec)


def per_shard_callback(host_fn: Callable[..., np.ndarray], dtype, *arrays: jax.Array
                       ) -> jax.Array:
    """``host_fn(*numpy_arrays) -> [b]`` on each batch shard; returns the ``[B]`` result.

    Every array has the batch on axis 0; ``host_fn`` must treat the items independently
    (it sees only its shard's ``b`` items). Gradients do not flow through it.
    """
    batch = arrays[0].shape[0]
    if any(a.shape[0] != batch for a in arrays):
        raise ValueError(f"per_shard_callback: arrays disagree on the batch size: "
                         f"{[a.shape[0] for a in arrays]}")
    arrays = tuple(jax.lax.stop_gradient(a) for a in arrays)

    def call(*xs):
        out = jax.ShapeDtypeStruct((xs[0].shape[0],), dtype)
        return jax.pure_callback(lambda *a: np.asarray(host_fn(*a), dtype), out, *xs)

    axes = batch_shard_axes(batch)
    if not axes:
        return call(*arrays)
    mesh, _ = active_mesh_and_rules()
    spec = P(axes if len(axes) > 1 else axes[0])
    in_specs = tuple(P(*spec, *([None] * (a.ndim - 1))) for a in arrays)
    # check_vma=False: the callback's result varies over the batch axes by construction.
    mapped = jax.shard_map(call, mesh=mesh, in_specs=in_specs, out_specs=spec, check_vma=False)
    return mapped(*arrays)
