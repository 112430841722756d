"""The optimizer of every stage: Muon for weight matrices, AdamW for everything else.

Muon orthogonalises the update of a matrix that maps one model-internal width to another
(attention and FFN projections, the timestep projection). Input/output layers (patch, audio
and text-input embeddings, the output projection), embedding-like tables, norms and biases
take AdamW, the usual split for Muon. Both share one warmup + cosine schedule; the global
gradient norm is clipped first.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import optax
from optax.contrib import MuonDimensionNumbers, muon

# Stacked blocks carry a leading "layers" axis: the last two axes are the matrix.
_MATRIX_DIMS = MuonDimensionNumbers(reduction_axis=-2, output_axis=-1)


def learning_rate_schedule(cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``cfg.learning_rate``, then cosine down to
    ``cfg.learning_rate * cfg.final_lr_ratio`` at ``total_steps``."""
    warmup = int(cfg.warmup_steps)
    total = max(int(total_steps), warmup + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=float(cfg.learning_rate), warmup_steps=warmup,
        decay_steps=total, end_value=float(cfg.learning_rate) * float(cfg.final_lr_ratio))


def is_muon_matrix(path: tuple[str, ...], logical_axes: tuple | None) -> bool:
    """A ``kernel`` whose two matrix axes are both named model widths (not an input or output
    layer, whose outer axis is unnamed: patch/text/audio embeddings, ``proj_out``)."""
    if not path or path[-1] != "kernel" or logical_axes is None:
        return False
    matrix_axes = [a for a in logical_axes if a != "layers"]
    return len(matrix_axes) == 2 and all(a is not None for a in matrix_axes)


def muon_dimension_numbers(logical_axes: Mapping) -> Any:
    """The tree optax's Muon takes: matrix dimension numbers where Muon applies, None
    elsewhere (AdamW). ``logical_axes`` is a pure dict of per-parameter axis-name tuples."""

    def walk(tree, path):
        if isinstance(tree, Mapping):
            return {k: walk(v, path + (str(k),)) for k, v in tree.items()}
        return _MATRIX_DIMS if is_muon_matrix(path, tree) else None

    return walk(logical_axes, ())


def optimizer_groups(logical_axes: Mapping) -> dict[str, list[str]]:
    """Parameter paths per group ('muon', 'adamw'), for the log."""
    groups = {"muon": [], "adamw": []}
    dims = muon_dimension_numbers(logical_axes)
    for path, d in jax.tree_util.tree_flatten_with_path(
            dims, is_leaf=lambda x: x is None or isinstance(x, MuonDimensionNumbers))[0]:
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        groups["muon" if d is not None else "adamw"].append(name)
    return groups


def make_optimizer(cfg, logical_axes: Mapping, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Clip, then Muon (matrices) / AdamW (the rest) on the warmup + cosine schedule.

    ``cfg`` is the ``optimizer`` section: learning_rate, warmup_steps, final_lr_ratio,
    clip_norm, weight_decay, adam_weight_decay, adam_b1, adam_b2, muon_beta, eps.
    Returns the transformation and its schedule (for logging).
    """
    schedule = learning_rate_schedule(cfg, total_steps)
    dims = muon_dimension_numbers(logical_axes)
    parts = []
    if cfg.clip_norm and cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(cfg.clip_norm)))
    parts.append(muon(
        learning_rate=schedule, beta=float(cfg.muon_beta), eps=float(cfg.eps),
        weight_decay=float(cfg.weight_decay), adam_b1=float(cfg.adam_b1),
        adam_b2=float(cfg.adam_b2), adam_weight_decay=float(cfg.adam_weight_decay),
        muon_weight_dimension_numbers=dims))
    return optax.chain(*parts), schedule


def ema_update(ema, params, decay: float):
    """``ema <- decay * ema + (1 - decay) * params`` (fp32)."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
