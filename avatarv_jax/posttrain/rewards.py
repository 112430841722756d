"""Rewards for preference alignment on AvatarWorld, computed inside the jitted step.

Generated latents are decoded by the frozen VAE and read by the AvatarWorld probe (its shipped
weights, a constant of the step). Each reward is one number per sample, higher is better:

* ``lip_sync``: Pearson correlation between the mouth opening the probe reads in the generated
  frames and the true mouth opening of the driving clip (the batch's ``motion``, which
  AvatarWorld derives from the audio), best lag within +-2 frames (as
  ``data/avatarworld/metrics.lip_sync``).
* ``identity``: cosine similarity of the probe's identity embedding (attribute probabilities
  averaged over frames) between generated frames and the reference frames.
* ``motion_style``: minus the mean absolute difference, per motion field other than the mouth
  and in units of the field's range, between the temporal standard deviation of the generated
  motion and that of the reference clip's motion (how much the head nods, sways and blinks).

They need the AvatarWorld batch contract (10-d ground-truth motion, reference video). The
lip-sync reward on real video, ``lse_c``, lives in ``posttrain.real_rewards``.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avatarv_jax.data.avatarworld import motion as mo
from avatarv_jax.data.avatarworld import probe as probe_lib

REWARDS = ("lip_sync", "identity", "motion_style")
MAX_LAG = 2
_MOUTH = mo.MOTION_FIELDS.index("mouth_open")
_STYLE_FIELDS = np.array([i for i, n in enumerate(mo.MOTION_FIELDS) if n != "mouth_open"])
_RANGE = np.asarray(mo.MOTION_HIGH - mo.MOTION_LOW, np.float32)


def check_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """The non-zero weights of known rewards: the probe's and those on real video
    (``posttrain.real_rewards``)."""
    from avatarv_jax.posttrain.real_rewards import REAL_REWARDS
    known = REWARDS + REAL_REWARDS
    unknown = sorted(set(weights) - set(known))
    if unknown:
        raise ValueError(f"unknown rewards {unknown} in reward_weights; known: {list(known)}")
    out = {k: float(v) for k, v in weights.items() if float(v) != 0.0}
    if not out:
        raise ValueError("reward_weights gives every reward weight 0: nothing to optimise")
    return out


def _pearson(a: jax.Array, b: jax.Array) -> jax.Array:
    """Correlation over the last axis; 0 where either side is constant."""
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    den = jnp.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    return jnp.where(den > 1e-8, (a * b).sum(-1) / jnp.maximum(den, 1e-8), 0.0)


def lagged_correlation(pred: jax.Array, true: jax.Array, max_lag: int = MAX_LAG) -> jax.Array:
    """Best Pearson correlation of [B, T] tracks over lags in ``[-max_lag, max_lag]``."""
    t = pred.shape[-1]
    best = []
    for lag in range(-max_lag, max_lag + 1):
        if t - abs(lag) < 3:
            continue
        p = pred[:, max(lag, 0):t + min(lag, 0)]
        q = true[:, max(-lag, 0):t + min(-lag, 0)]
        best.append(_pearson(p, q))
    return jnp.max(jnp.stack(best), axis=0)


def identity_embedding(probs: list[jax.Array]) -> jax.Array:
    """[B, T, classes] per attribute -> the unit-norm clip embedding [B, E]."""
    e = jnp.concatenate([p.mean(1) for p in probs], axis=-1)
    return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-8)


class ProbeRewards:
    """The probe's reading of decoded frames, turned into the rewards above."""

    def __init__(self, probe: probe_lib.Probe | None = None):
        probe = probe or probe_lib.load_probe()
        self.graphdef, self.state = nnx.split(probe.model)

    def read(self, frames: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        """frames [B, T, H, W, 3] in [-1, 1] -> motion [B, T, D], per-attribute probs."""
        unit, probs = self.read_unit(frames)
        return probe_lib.motion_from_unit(unit), probs

    def read_unit(self, frames: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        """Like ``read``, but the motion head's unclipped [0, 1]-normalised outputs (a loss
        on them keeps its gradient where the clipped reading saturates)."""
        b, t, h, w, _ = frames.shape
        x = jnp.clip(frames.reshape(b * t, h, w, 3).astype(jnp.float32), -1.0, 1.0)
        size = probe_lib.INPUT_SIZE
        if (h, w) != (size, size):
            x = jax.image.resize(x, (b * t, size, size, 3), "linear", antialias=True)
        net = nnx.merge(self.graphdef, self.state)
        unit, logits = net(x)
        probs = [jax.nn.softmax(l, -1).reshape(b, t, -1)
                 for l in probe_lib.split_logits(logits)]
        return unit.reshape(b, t, -1), probs

    def __call__(self, frames: jax.Array, batch: Mapping[str, jax.Array],
                 ref_frames: jax.Array) -> dict[str, jax.Array]:
        """Every reward, [B] each. ``batch`` holds the driving clip's true ``motion``
        [B, T, 10]; ``ref_frames`` [B, T_ref, H, W, 3] in [-1, 1] are the reference."""
        motion, probs = self.read(frames)
        ref_motion, ref_probs = self.read(ref_frames)
        true = batch["motion"].astype(jnp.float32)
        if true.shape[-1] != mo.MOTION_DIM:
            raise ValueError(f"the probe rewards need AvatarWorld motion ({mo.MOTION_DIM} "
                             f"fields); the batch's motion has {true.shape[-1]}")
        t = min(true.shape[1], motion.shape[1])
        lip = lagged_correlation(motion[:, :t, _MOUTH], true[:, :t, _MOUTH])
        e, e_ref = identity_embedding(probs), identity_embedding(ref_probs)
        identity = (e * e_ref).sum(-1)
        std = motion[..., _STYLE_FIELDS].std(1) / _RANGE[_STYLE_FIELDS]
        ref_std = ref_motion[..., _STYLE_FIELDS].std(1) / _RANGE[_STYLE_FIELDS]
        style = -jnp.abs(std - ref_std).mean(-1)
        return {"lip_sync": lip, "identity": identity, "motion_style": style}
