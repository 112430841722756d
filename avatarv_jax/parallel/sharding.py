"""Logical axis names -> mesh shardings.

Layers name logical axes only (``embed``, ``heads``, ``mlp``, ``activation_batch``, ...). The
config's ``logical_axis_rules`` (pairs ``(logical, mesh axis or axes or None)``) map them onto
the mesh. Activations are constrained through ``constrain`` inside ``use_rules(mesh, rules)``;
outside such a context ``constrain`` does nothing, so single-device code needs no mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterable, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from flax import nnx

Rules = Sequence[tuple[str, str | Sequence[str] | None]]

_CONTEXT: contextvars.ContextVar = contextvars.ContextVar("avatarv_logical_rules", default=None)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules):
    """Within this context, ``constrain`` places activations on ``mesh`` by ``rules``."""
    token = _CONTEXT.set((mesh, tuple((k, v) for k, v in rules)))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def active_mesh_and_rules():
    """``(mesh, rules)`` of the enclosing ``use_rules`` context, or None outside one."""
    return _CONTEXT.get()


def logical_to_mesh_spec(logical: Iterable[str | None], rules: Rules,
                         shape: Sequence[int] | None = None,
                         mesh: Mesh | None = None) -> P:
    """Translate logical axis names to a mesh PartitionSpec.

    A mesh axis is used at most once per spec (later dimensions give way). With ``shape`` and
    ``mesh`` given, a dimension the mesh axes do not divide is replicated instead.
    """
    table = dict(rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(logical):
        target = table.get(name) if name is not None else None
        axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        axes = tuple(a for a in axes if a not in used)
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
        if axes and shape is not None and mesh is not None:
            if shape[i] % math.prod(mesh.shape[a] for a in axes):
                axes = ()
        used.update(axes)
        out.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    return P(*out)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names inside ``use_rules``; identity outside."""
    ctx = _CONTEXT.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    spec = logical_to_mesh_spec(logical, rules, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _logical_axes(variable) -> tuple | None:
    meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
    for key in ("out_sharding", "sharding_names", "sharding"):
        if meta.get(key) is not None:
            return tuple(meta[key])
    return None


def state_logical_axes(state: nnx.State) -> nnx.State:
    """The logical axis names of every parameter, as a State of tuples (None = unnamed)."""
    return jax.tree.map(lambda v: _logical_axes(v), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
    """NamedShardings for a (possibly abstract) State, from its logical axis metadata."""

    def one(variable):
        axes = _logical_axes(variable)
        shape = variable.shape if hasattr(variable, "shape") else variable[...].shape
        if axes is None:
            axes = (None,) * len(shape)
        if len(axes) != len(shape):
            raise ValueError(f"logical axes {axes} do not match parameter shape {shape}")
        return NamedSharding(mesh, logical_to_mesh_spec(axes, rules, shape, mesh))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def unnamed_parameters(state: nnx.State) -> list[str]:
    """Paths of parameters without logical axis names (every parameter should have them)."""
    missing = []
    for path, variable in nnx.to_flat_state(state):
        if isinstance(variable, nnx.Variable) and _logical_axes(variable) is None:
            missing.append("/".join(str(p) for p in path))
    return missing
