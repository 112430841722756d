"""Ulysses sequence parallelism around Sparse Reference Attention (DESIGN §10).

With the mesh's ``sequence`` axis of size n > 1, every device holds 1/n of the query/key/value
tokens of each segment. An all-to-all over ``sequence`` trades that for all tokens of 1/n of
the heads, the SRA implementation runs unchanged on full sequences (its layout, REF/GEN rule
and reference validity are global), and a second all-to-all returns the output to the token
split. The quadratic part of attention is thus split n ways with two all-to-alls of
activations per layer, whatever the attention implementation.

Applied by ``layers.attention.sparse_reference_attention`` whenever it is traced inside
``parallel.sharding.use_rules`` with a mesh whose ``sequence`` axis is larger than 1.
Requirements (checked, with a clear error): every segment's token count divisible by n, the
head count divisible by n times the tensor-parallel degree.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
from jax.sharding import Mesh, PartitionSpec as P

from avatarv_jax.parallel import sharding as sharding_lib

AXIS = "sequence"


def sequence_parallel_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else int(mesh.shape.get(AXIS, 1))


def _mesh_axes(rules, name: str, mesh: Mesh, size: int) -> tuple[str, ...]:
    """Mesh axes the logical ``name`` maps to (size > 1, dividing ``size``, not 'sequence')."""
    target = dict(rules).get(name)
    axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    axes = tuple(a for a in axes if a != AXIS and mesh.shape.get(a, 1) > 1)
    if axes and size % math.prod(mesh.shape[a] for a in axes):
        return ()
    return axes


def _spec_entry(axes: tuple[str, ...]):
    return None if not axes else (axes[0] if len(axes) == 1 else axes)


def ulysses_attention(impl: Callable, mesh: Mesh, rules) -> Callable:
    """``impl`` (the SRA signature) wrapped in Ulysses all-to-alls over ``sequence``."""
    n = sequence_parallel_size(mesh)

    def wrapped(q_ref, k_ref, v_ref, q_gen, k_gen, v_gen, *, layout, ref_valid_frames=None):
        arrays = dict(q_ref=q_ref, k_ref=k_ref, v_ref=v_ref, q_gen=q_gen, k_gen=k_gen,
                      v_gen=v_gen)
        present = {k: v for k, v in arrays.items() if v is not None}
        any_x = next(iter(present.values()))
        batch, heads = any_x.shape[0], any_x.shape[2]
        batch_axes = _mesh_axes(rules, "activation_batch", mesh, batch)
        head_axes = _mesh_axes(rules, "activation_heads", mesh, heads)
        tensor = math.prod(mesh.shape[a] for a in head_axes) if head_axes else 1
        if heads % (tensor * n):
            raise ValueError(f"Ulysses: {heads} heads do not split over sequence={n} x "
                             f"tensor={tensor} devices; choose a mesh whose sequence x tensor "
                             "divides the head count")
        for name, x in present.items():
            if x.shape[1] % n:
                raise ValueError(f"Ulysses: {name} has {x.shape[1]} tokens, not divisible by "
                                 f"sequence={n}; choose frame counts / resolution so every "
                                 "segment's tokens split evenly, or a smaller sequence axis")
        b_spec, h_spec = _spec_entry(batch_axes), _spec_entry(head_axes)
        # Empty segments (no REF) stay whole: nothing to exchange.
        seq_spec = {k: (AXIS if x.shape[1] else None) for k, x in present.items()}
        in_specs = {k: P(b_spec, seq_spec[k], h_spec, None) for k in present}
        valid_spec = None if ref_valid_frames is None else P(b_spec)

        def local(xs, valid):
            def to_heads(x):        # [b, S/n, h, D] -> [b, S, h/n, D]
                if x.shape[1] == 0:
                    return x[:, :, : x.shape[2] // n]
                return jax.lax.all_to_all(x, AXIS, split_axis=2, concat_axis=1, tiled=True)

            def to_tokens(x):       # [b, S, h/n, D] -> [b, S/n, h, D]
                return jax.lax.all_to_all(x, AXIS, split_axis=1, concat_axis=2, tiled=True)

            full = {k: to_heads(v) for k, v in xs.items()}
            o_ref, o_gen = impl(full.get("q_ref"), full.get("k_ref"), full.get("v_ref"),
                                full.get("q_gen"), full.get("k_gen"), full.get("v_gen"),
                                layout=layout, ref_valid_frames=valid)
            return (None if o_ref is None else to_tokens(o_ref),
                    None if o_gen is None else to_tokens(o_gen))

        out_specs = (None if q_ref is None else P(b_spec, AXIS, h_spec, None),
                     None if q_gen is None else P(b_spec, AXIS, h_spec, None))
        fn = jax.shard_map(local, mesh=mesh, in_specs=(in_specs, valid_spec),
                           out_specs=out_specs, check_vma=False)
        return fn(present, ref_valid_frames)

    return wrapped


def maybe_ulysses(impl: Callable) -> Callable:
    """``impl`` itself, or its Ulysses wrapper inside ``use_rules`` with sequence > 1."""
    ctx = sharding_lib.active_mesh_and_rules()
    if ctx is None or sequence_parallel_size(ctx[0]) == 1:
        return impl
    return ulysses_attention(impl, *ctx)
