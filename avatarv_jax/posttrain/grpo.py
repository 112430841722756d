"""Flow-GRPO: group-relative policy optimisation of a flow model sampled by the SDE (``sde``).

For each condition the policy draws G samples with the SDE sampler, keeping every transition's
exact log-probability. Rewards (several reward functions, combined with config weights) are
normalised within the group, ``A = (r - mean_G r) / (std_G r + eps)``, so no value network is
needed and only the ranking within a condition matters. Each sampling step is one action of a
Gaussian policy; the loss is PPO's clipped surrogate over (a random subset of) the steps,

    L = E[max(-A rho, -A clip(rho, 1 - c, 1 + c))] + beta_KL E[KL],
    rho = exp(log pi_new(x' | x) - log pi_old(x' | x)),

and the KL to the frozen reference is that of two Gaussians with the same std,
``||mean_policy - mean_ref||^2 / (2 std^2)``, per step, which keeps the policy near the model
it started from (reward hacking guard).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def combine_rewards(rewards: Mapping[str, jax.Array], weights: Mapping[str, float]) -> jax.Array:
    """``sum_k weights[k] * rewards[k]`` -> [B]; every weight must name a reward."""
    missing = sorted(set(weights) - set(rewards))
    if missing:
        raise KeyError(f"reward weights {missing} name no reward; rewards available: "
                       f"{sorted(rewards)}")
    if not weights:
        raise ValueError("no reward weights given: at least one reward must be weighted")
    total = None
    for name, w in weights.items():
        term = float(w) * jnp.asarray(rewards[name], jnp.float32)
        total = term if total is None else total + term
    return total


def group_advantages(rewards: jax.Array, eps: float = 1e-4) -> jax.Array:
    """[N, G] rewards (G samples of each of N conditions) -> advantages with zero mean and unit
    std (population std) within each group; a group of equal rewards gets zeros."""
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [N, G], got shape {rewards.shape}")
    mean = rewards.mean(axis=1, keepdims=True)
    std = rewards.std(axis=1, keepdims=True)
    return (rewards - mean) / (std + eps)


def transition_kl(mean_policy: PyTree, mean_ref: PyTree, std) -> jax.Array:
    """KL(N(mean_policy, std^2) || N(mean_ref, std^2)) per sample [B]: the squared mean
    difference summed over every element, over ``2 std^2`` (std scalar or [B])."""
    std = jnp.maximum(jnp.asarray(std, jnp.float32), 1e-20)
    sq = jax.tree.leaves(jax.tree.map(
        lambda a, b: jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)),
        mean_policy, mean_ref))
    total = sum(a.reshape(a.shape[0], -1).sum(axis=1) for a in sq)
    return total / (2.0 * jnp.square(std))


def grpo_loss(logp_new: jax.Array, logp_old: jax.Array, advantages: jax.Array, *,
              clip_range: float, kl: jax.Array | None = None,
              kl_weight: float = 0.0) -> tuple[jax.Array, dict]:
    """PPO's clipped surrogate plus ``kl_weight * mean(kl)``, all [B] inputs.

    ``logp_old`` is a constant (the sampling policy). Terms: loss, policy_loss, clip_frac
    (fraction of samples whose ratio left [1 - c, 1 + c]), ratio (mean), kl (mean).
    """
    if clip_range <= 0:
        raise ValueError(f"clip_range must be positive, got {clip_range}")
    ratio = jnp.exp(logp_new.astype(jnp.float32)
                    - jax.lax.stop_gradient(logp_old.astype(jnp.float32)))
    adv = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = jnp.mean(jnp.maximum(unclipped, clipped))
    kl_mean = jnp.zeros((), jnp.float32) if kl is None else jnp.mean(kl.astype(jnp.float32))
    loss = policy_loss + kl_weight * kl_mean
    clip_frac = jnp.mean((jnp.abs(ratio - 1.0) > clip_range).astype(jnp.float32))
    return loss, {"loss": loss, "policy_loss": policy_loss, "clip_frac": clip_frac,
                  "ratio": jnp.mean(ratio), "kl": kl_mean}


def select_train_steps(key: jax.Array, num_steps: int, count: int) -> jax.Array:
    """``count`` distinct sampling-step indices in [0, num_steps), sorted; ``count = num_steps``
    gives every step (Flow-GRPO trains on a random subset to save compute)."""
    if not 1 <= int(count) <= int(num_steps):
        raise ValueError(f"count must be in [1, num_steps={num_steps}], got {count}")
    if int(count) == int(num_steps):
        return jnp.arange(int(num_steps), dtype=jnp.int32)
    return jnp.sort(jax.random.permutation(key, int(num_steps))[:int(count)]).astype(jnp.int32)
