"""Diffusion-DPO in the flow-matching form, and the preference pairs it trains on.

DPO fits a policy to preferences ``x_w > x_l`` (same condition) without a reward model: the
implicit reward is the policy's log-likelihood ratio to a frozen reference. For diffusion and
flow models the likelihood is replaced by its evidence bound, whose per-sample part is the
denoising (here flow-matching) error at a random noise level with shared noise, so the loss is

    L = -log sigmoid(-beta [(e_w^policy - e_w^ref) - (e_l^policy - e_l^ref)]),

``e = || v(x_s, s) - (eps - x0) ||^2``: lowering the policy's error on the preferred sample
relative to the reference, and raising it on the rejected one, increases the margin
``-beta [...]``. At policy = reference the loss is log 2. Pairs come from human labels (a JSONL
manifest, ``read_preference_manifest``) or from ranking G samples of a condition by reward
(``rank_pairs``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any

_REQUIRED = ("reference", "audio", "preferred", "rejected")
_OPTIONAL = ("caption", "annotator", "note")


def flow_errors(v_pred: PyTree, x0: PyTree, noise: PyTree) -> jax.Array:
    """Per-sample mean squared flow-matching error [B] over every element of every leaf."""
    errs = jax.tree.leaves(jax.tree.map(
        lambda p, a, n: jnp.square(p.astype(jnp.float32)
                                   - (n.astype(jnp.float32) - a.astype(jnp.float32))),
        v_pred, x0, noise))
    total = sum(e.reshape(e.shape[0], -1).sum(axis=1) for e in errs)
    return total / sum(e[0].size for e in errs)


def diffusion_dpo_loss(err_policy_w, err_policy_l, err_ref_w, err_ref_l, *,
                       beta: float) -> tuple[jax.Array, dict]:
    """Mean over the batch of ``-log sigmoid(margin)``, ``margin = -beta ((e_pw - e_rw) -
    (e_pl - e_rl))`` (the implicit reward of the preferred minus the rejected sample); the
    reference errors are constants. Terms: loss, margin (mean), accuracy (fraction > 0)."""
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    e_pw, e_pl = (jnp.asarray(e, jnp.float32) for e in (err_policy_w, err_policy_l))
    e_rw, e_rl = (jax.lax.stop_gradient(jnp.asarray(e, jnp.float32))
                  for e in (err_ref_w, err_ref_l))
    margin = -beta * ((e_pw - e_rw) - (e_pl - e_rl))
    loss = jnp.mean(-jax.nn.log_sigmoid(margin))
    return loss, {"loss": loss, "margin": jnp.mean(margin),
                  "accuracy": jnp.mean((margin > 0).astype(jnp.float32))}


def rank_pairs(rewards: jax.Array, min_margin: float = 0.0):
    """Automatic pairs from G reward-ranked samples per condition ([N, G] rewards): the best
    and the worst sample index [N], and ``keep`` [N] (best minus worst reward > min_margin;
    a group of equal rewards is never kept)."""
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [N, G] with G >= 2, got shape {rewards.shape}")
    best = jnp.argmax(rewards, axis=1)
    worst = jnp.argmin(rewards, axis=1)
    keep = (rewards.max(axis=1) - rewards.min(axis=1)) > min_margin
    return best, worst, keep


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """One human preference: two videos generated for the same reference, audio and caption."""

    reference: str
    audio: str
    preferred: str
    rejected: str
    caption: str | None = None
    annotator: str | None = None
    note: str | None = None


class PreferenceManifestError(ValueError):
    """A preference manifest that cannot be read; the message names the file and the line."""


def read_preference_manifest(path: str) -> list[PreferencePair]:
    """Read a JSONL preference manifest: one JSON object per line with the paths ``reference``,
    ``audio``, ``preferred`` and ``rejected`` (relative ones resolve against the manifest's
    directory; every file must exist) and optional strings ``caption``, ``annotator``, ``note``.
    Blank lines are skipped."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PreferenceManifestError(f"{path}: preference manifest not found")
    base = os.path.dirname(os.path.abspath(path))
    pairs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise PreferenceManifestError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(entry, dict):
                raise PreferenceManifestError(f"{where}: expected a JSON object, got "
                                              f"{type(entry).__name__}")
            missing = [k for k in _REQUIRED if k not in entry]
            if missing:
                raise PreferenceManifestError(f"{where}: missing key(s) {missing}")
            unknown = sorted(set(entry) - set(_REQUIRED) - set(_OPTIONAL))
            if unknown:
                raise PreferenceManifestError(f"{where}: unknown key(s) {unknown}")
            fields = {}
            for key in _REQUIRED:
                value = entry[key]
                if not isinstance(value, str) or not value:
                    raise PreferenceManifestError(f"{where}: '{key}' must be a non-empty path "
                                                  f"string, got {value!r}")
                resolved = os.path.normpath(os.path.join(base, value))
                if not os.path.isfile(resolved):
                    raise PreferenceManifestError(f"{where}: '{key}' file not found: {resolved}")
                fields[key] = resolved
            for key in _OPTIONAL:
                value = entry.get(key)
                if value is not None and not isinstance(value, str):
                    raise PreferenceManifestError(f"{where}: '{key}' must be a string, got "
                                                  f"{value!r}")
                fields[key] = value
            if os.path.realpath(fields["preferred"]) == os.path.realpath(fields["rejected"]):
                raise PreferenceManifestError(f"{where}: 'preferred' and 'rejected' are the "
                                              f"same file ({fields['preferred']})")
            pairs.append(PreferencePair(**fields))
    return pairs
