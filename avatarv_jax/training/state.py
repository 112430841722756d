"""The training state: one pytree that the step donates, Orbax saves and any mesh restores.

Parameters are pure dicts (no NNX objects), so the same tree goes to optax, Orbax and
``jax.device_put``. Randomness is not state: the step's key is ``fold_in(seed, step)``, which
makes a resumed run draw exactly the noise an uninterrupted run would.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
    step: jax.Array          # int32 scalar: batches consumed (skipped ones included)
    params: Any              # pure dict of fp32 DiT parameters
    opt_state: Any
    ema: Any | None          # pure dict, or None when EMA is off
    bad_steps: jax.Array     # int32 scalar: non-finite steps in a row (NaN guard)
    # A second trained model of a stage that has one, as {"params", "opt_state"} (DMD's fake
    # score); None otherwise. ``params`` above stays the model that inference uses.
    aux: Any | None = None


def create_train_state(params, tx: optax.GradientTransformation, *, use_ema: bool) -> TrainState:
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema=jax.tree.map(jnp.copy, params) if use_ema else None,
                      bad_steps=jnp.zeros((), jnp.int32))
