"""Parameter creation with logical axis names.

Every parameter carries the logical names of its axes (``embed``, ``heads``, ``mlp``, ...) as
metadata. Only ``avatarv_jax.parallel`` maps those names onto mesh axes, through the config's
``logical_axis_rules``. Eager sharding is off: parameters are placed by the jitted
initialiser or the checkpoint restore, never at construction.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = Sequence[str | None]

zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()
xavier_uniform = nnx.initializers.xavier_uniform()


def normal(stddev: float) -> Callable:
    return nnx.initializers.normal(stddev)


def _cheap_key(key: jax.Array) -> jax.Array:
    """The same stream of keys, drawn through the ``rbg`` generator.

    Threefry-based initialisers (truncated normals above all) compile to large programs: a
    model with a few hundred parameters took tens of seconds to initialise on CPU. ``rbg``
    lowers each draw to one RNG op. Initial values stay deterministic per seed and device kind.
    """
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        data = jax.random.key_data(key).reshape(-1)
    else:
        data = jnp.asarray(key, jnp.uint32).reshape(-1)
    data = jnp.concatenate([data, data[::-1] ^ jnp.uint32(0x9E3779B9)])[:4]
    return jax.random.wrap_key_data(data, impl="rbg")


def make_param(rngs: nnx.Rngs | None, init: Callable, shape: Sequence[int], axes: Axes,
               dtype=jnp.float32) -> nnx.Param:
    """A parameter of ``shape`` initialised by ``init`` and named by ``axes``."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {tuple(axes)} do not match shape {tuple(shape)}")
    key = rngs.params() if rngs is not None else jax.random.key(0)
    value = init(_cheap_key(key), tuple(shape), dtype)
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)
