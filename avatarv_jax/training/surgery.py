"""Parameter surgery between training stages (DESIGN §5).

A stage's DiT is the previous stage's plus new modules (A2V: audio cross-attention and
projections; SFT: the motion encoder and head). Every parameter the two share is carried over
bit for bit; parameters only the new model has keep their fresh initialisation (the zero
output projections make the new paths start as no-ops); the report lists both. A shared name
with a different shape, or a parameter the new model would drop, is an error unless allowed:
it means the configs disagree about more than the new modules.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import numpy as np


@dataclasses.dataclass
class SurgeryReport:
    carried: list[str]
    new: list[str]           # freshly initialised in the new model
    zero_init: list[str]     # the subset of ``new`` that starts at exactly zero
    dropped: list[str]       # in the old model only

    def lines(self) -> list[str]:
        out = [f"parameter surgery: {len(self.carried)} carried over, {len(self.new)} new, "
               f"{len(self.dropped)} dropped"]
        out += [f"  new ({'zero' if n in self.zero_init else 'fresh'} init): {n}"
                for n in self.new]
        out += [f"  dropped: {n}" for n in self.dropped]
        return out


def _flat(tree: Mapping) -> dict[str, object]:
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflatten(flat: Mapping[str, object]) -> dict:
    out: dict = {}
    for name, leaf in flat.items():
        node = out
        *parents, last = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return out


def transplant(old: Mapping, new: Mapping, *, allow_dropped: bool = False
               ) -> tuple[dict, SurgeryReport]:
    """New-model parameters with every shared parameter taken from ``old``."""
    old_flat, new_flat = _flat(old), _flat(new)
    mismatched = [f"{k}: previous stage {np.shape(old_flat[k])}, this stage "
                  f"{np.shape(new_flat[k])}" for k in sorted(set(old_flat) & set(new_flat))
                  if np.shape(old_flat[k]) != np.shape(new_flat[k])]
    if mismatched:
        raise ValueError("parameter surgery: shared parameters changed shape (the stage "
                         "configs differ in more than new modules): " + "; ".join(mismatched[:5]))
    dropped = sorted(set(old_flat) - set(new_flat))
    if dropped and not allow_dropped:
        raise ValueError(f"parameter surgery: the new model has no place for {dropped[:5]}"
                         f"{' ...' if len(dropped) > 5 else ''}; pass allow_dropped to drop them")
    merged, carried, fresh, zero = {}, [], [], []
    for name, leaf in new_flat.items():
        if name in old_flat:
            merged[name] = old_flat[name]
            carried.append(name)
        else:
            merged[name] = leaf
            fresh.append(name)
            if not np.any(np.asarray(jax.device_get(leaf))):
                zero.append(name)
    return _unflatten(merged), SurgeryReport(sorted(carried), sorted(fresh), sorted(zero),
                                             dropped)
