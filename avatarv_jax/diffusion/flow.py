"""Rectified flow (Wan 2.1 convention): noising, the velocity target, timestep sampling, losses.

Convention: ``sigma`` runs over [0, 1] with data at 0 and noise at 1,
``x_sigma = (1 - sigma) * x0 + sigma * noise``, and the network predicts the velocity
``d x_sigma / d sigma = noise - x0``. The network is fed ``timestep = sigma * NUM_TRAIN_TIMESTEPS``.

Latents are pytrees (``{'video': [B, F, H, W, C], 'motion': [B, F, D]}``) whose leaves share the
leading batch and latent-frame axes, so one per-frame ``sigma`` of shape [B, F] noises both
streams in step: the video and the motion of a latent frame always sit at the same noise level.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

NUM_TRAIN_TIMESTEPS = 1000

PyTree = Any


def sigma_to_timestep(sigma: jax.Array) -> jax.Array:
    """The timestep the network is conditioned on (Wan's 0..1000 scale)."""
    return jnp.asarray(sigma, jnp.float32) * NUM_TRAIN_TIMESTEPS


def shift_sigma(sigma: jax.Array, shift: float | jax.Array) -> jax.Array:
    """Warp sigma towards 1 (``shift > 1``): more of the steps are spent at high noise.

    ``shift * s / (1 + (shift - 1) * s)`` keeps 0 and 1 fixed and is monotone, so it maps a
    schedule to a schedule and a distribution's median to the shifted median.
    """
    if isinstance(shift, (int, float)) and shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    sigma = jnp.asarray(sigma, jnp.float32)
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def resolution_shift(tokens_per_frame: int, *, base_tokens: int = 256, max_tokens: int = 4096,
                     base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Sigma shift for a frame of ``tokens_per_frame`` tokens: ``exp(mu)``, mu linear in tokens.

    Larger frames need more noise: neighbouring tokens are strongly correlated, so at a given
    sigma a high-resolution frame still shows its coarse layout through the noise, and the
    coarse structure would be decided in the last few steps. Shifting sigma up with the token
    count restores the signal-to-noise ratio at which the layout forms. mu is interpolated
    between ``(base_tokens, base_shift)`` and ``(max_tokens, max_shift)`` and extrapolated
    linearly outside that range.
    """
    if tokens_per_frame <= 0:
        raise ValueError(f"tokens_per_frame must be positive, got {tokens_per_frame}")
    if max_tokens <= base_tokens:
        raise ValueError(f"max_tokens ({max_tokens}) must exceed base_tokens ({base_tokens})")
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    mu = base_shift + slope * (tokens_per_frame - base_tokens)
    return float(math.exp(mu))


def sample_training_sigma(key: jax.Array, shape: tuple[int, ...], *, logit_mean: float = 0.0,
                          logit_std: float = 1.0, shift: float = 1.0,
                          eps: float = 1e-5) -> jax.Array:
    """Training noise levels: logit-normal (weights the middle, where the velocity is hardest),
    then shifted like the sampling schedule, clipped to ``[eps, 1 - eps]`` so that neither the
    pure-data nor the pure-noise end (both degenerate targets) is ever drawn exactly.
    """
    if logit_std < 0:
        raise ValueError(f"logit_std must be non-negative, got {logit_std}")
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"eps must be in [0, 0.5), got {eps}")
    u = logit_mean + logit_std * jax.random.normal(key, shape, jnp.float32)
    sigma = shift_sigma(jax.nn.sigmoid(u), shift)
    return jnp.clip(sigma, eps, 1.0 - eps)


def prefix_frame_sigma(sigma: jax.Array, num_frames: int,
                       num_prefix: int = 0) -> tuple[jax.Array, jax.Array]:
    """Per-frame sigma [B, F] for a GEN segment whose first ``num_prefix`` frames are clean.

    Returns ``(sigma_bf, frame_mask)``: sigma is 0 on the carried-over prefix and ``sigma[b]``
    elsewhere; ``frame_mask`` is 1 on the noisy frames, the ones the loss counts.
    """
    if not 0 <= num_prefix < num_frames:
        raise ValueError(f"need 0 <= num_prefix < num_frames, got {num_prefix} and {num_frames}")
    sigma = jnp.asarray(sigma, jnp.float32)
    if sigma.ndim != 1:
        raise ValueError(f"sigma must have shape [B], got {sigma.shape}")
    frame_mask = (jnp.arange(num_frames) >= num_prefix).astype(jnp.float32)
    frame_mask = jnp.broadcast_to(frame_mask, (sigma.shape[0], num_frames))
    return sigma[:, None] * frame_mask, frame_mask


def _expand_leading(values: jax.Array, leaf: jax.Array, what: str) -> jax.Array:
    """Reshape ``values`` (shape = a prefix of ``leaf.shape``) to broadcast over ``leaf``."""
    values = jnp.asarray(values)
    if values.shape != leaf.shape[:values.ndim]:
        raise ValueError(
            f"{what} of shape {values.shape} does not match the leading axes of an array of "
            f"shape {leaf.shape} (expected a scalar, [B] or [B, F])")
    return values.reshape(values.shape + (1,) * (leaf.ndim - values.ndim))


def noise_latents(x0: PyTree, noise: PyTree, sigma: jax.Array) -> PyTree:
    """``(1 - sigma) * x0 + sigma * noise`` leaf by leaf, sigma scalar, [B] or [B, F].

    Computed in fp32 and cast back to each leaf's dtype.
    """
    def mix(a, n):
        if a.shape != n.shape:
            raise ValueError(f"x0 shape {a.shape} differs from noise shape {n.shape}")
        s = _expand_leading(jnp.asarray(sigma, jnp.float32), a, "sigma")
        out = (1.0 - s) * a.astype(jnp.float32) + s * n.astype(jnp.float32)
        return out.astype(a.dtype)

    return jax.tree.map(mix, x0, noise)


def velocity_target(x0: PyTree, noise: PyTree) -> PyTree:
    """The rectified-flow regression target ``noise - x0`` (constant along each straight path)."""
    return jax.tree.map(lambda a, n: n - a, x0, noise)


def _spread_weights(weights: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Bring per-token weights to element resolution.

    Each axis of ``weights`` must equal the target axis, be 1 (broadcast), or divide it; a
    dividing axis is repeated, so a token's weight covers every latent pixel of its patch
    (weights at [B, F, H/16, W/16, 1] apply to a velocity at [B, F, H/8, W/8, C]).
    """
    weights = jnp.asarray(weights, jnp.float32)
    if weights.ndim != len(shape):
        raise ValueError(f"token_weights of shape {weights.shape} must have the rank of the "
                         f"prediction {shape}")
    for axis, (w, n) in enumerate(zip(weights.shape, shape)):
        if w in (1, n):
            continue
        if n % w:
            raise ValueError(f"token_weights of shape {weights.shape} cannot be spread over a "
                             f"prediction of shape {shape}: axis {axis} ({w}) neither equals, "
                             f"is 1, nor divides {n}")
        weights = jnp.repeat(weights, n // w, axis=axis)
    return weights


def flow_loss(pred: jax.Array, target: jax.Array, *, token_weights: jax.Array | None = None,
              frame_mask: jax.Array | None = None) -> jax.Array:
    """Weighted mean squared error of a velocity, in fp32.

    ``token_weights`` (e.g. [B, F, H/16, W/16, 1] from ``region_token_weights``) scale each
    element's error; ``frame_mask`` [B, F] zeroes the clean prefix frames. The sum is divided
    by the sum of the effective weights, so the loss is a weighted *mean*: its scale does not
    change with how much of the frame is face or how many frames are noisy, and only the
    relative emphasis between regions does. A batch with nothing counted gives 0, not NaN.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {pred.shape} differs from target shape {target.shape}")
    err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    weights = jnp.ones((1,) * err.ndim, jnp.float32)
    if token_weights is not None:
        weights = _spread_weights(token_weights, err.shape)
    if frame_mask is not None:
        if err.ndim < 2:
            raise ValueError(f"frame_mask needs a [B, F, ...] prediction, got {err.shape}")
        weights = weights * _expand_leading(jnp.asarray(frame_mask, jnp.float32), err,
                                            "frame_mask")
    weights = jnp.broadcast_to(weights, err.shape)
    total = jnp.sum(weights * err)
    norm = jnp.sum(weights)
    return jnp.where(norm > 0, total / jnp.maximum(norm, 1e-12), 0.0)


def motion_loss(pred: jax.Array, target: jax.Array,
                frame_mask: jax.Array | None = None) -> jax.Array:
    """Mean squared error of the motion velocity [B, F, D] over the counted frames."""
    return flow_loss(pred, target, frame_mask=frame_mask)


def total_loss(pred: Mapping[str, jax.Array], target: Mapping[str, jax.Array], *,
               token_weights: jax.Array | None = None, frame_mask: jax.Array | None = None,
               motion_weight: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Region-weighted video flow loss plus ``motion_weight`` times the motion loss.

    ``pred`` and ``target`` are ``{'video': ..., 'motion': ...}``; 'motion' may be absent
    (stages without the motion stream), then its term is 0. Returns ``(loss, terms)`` with
    ``terms = {'video', 'motion', 'total'}`` for logging.
    """
    if "video" not in pred or "video" not in target:
        raise KeyError(f"pred and target need a 'video' entry, got {sorted(pred)} and "
                       f"{sorted(target)}")
    if ("motion" in pred) != ("motion" in target):
        raise KeyError(f"'motion' must be in both pred and target or in neither, got "
                       f"{sorted(pred)} and {sorted(target)}")
    video = flow_loss(pred["video"], target["video"], token_weights=token_weights,
                      frame_mask=frame_mask)
    if "motion" in pred:
        motion = motion_loss(pred["motion"], target["motion"], frame_mask)
    else:
        motion = jnp.zeros((), jnp.float32)
    loss = video + motion_weight * motion
    return loss, {"video": video, "motion": motion, "total": loss}
