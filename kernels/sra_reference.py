"""Dense-mask Sparse Reference Attention: the ground truth for the fast kernels.

REF and GEN keys/values arrive as separate arrays (the REF ones may come from a ``RefCache``);
this reference concatenates them and applies the dense mask of ``SRALayout``. It is O(S^2) in
memory and time and meant for tests and small models.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from avatarv_jax.kernels.sra_layout import SRALayout

_NEG = -1e30  # large finite negative: keeps fully-masked logits finite in fp32


def sra_reference(q_ref, k_ref, v_ref, q_gen, k_gen, v_gen, *, layout: SRALayout,
                  ref_valid_frames=None, return_lse: bool = False):
    """Attention of REF and GEN queries under the SRA rule.

    Args:
      q_ref: [B, ref_len, H, D] REF queries, or None to compute only GEN rows (cached path).
      k_ref, v_ref: [B, ref_len, H, D] (ref_len may be 0).
      q_gen, k_gen, v_gen: [B, gen_len, H, D], or all None to compute only REF rows (building
        a reference cache, ``layout.gen_frames == 0``).
      layout: the SRA layout (frames, tokens per frame, windows).
      ref_valid_frames: optional [B] int; GEN queries see only REF frames below it.
      return_lse: also return the log-sum-exp of the logits per query, [B, H, S_q].

    Returns:
      (o_ref, o_gen) each [B, S, H, D] in the query dtype (None for an absent query side),
      plus (lse_ref, lse_gen) when ``return_lse``.
    """
    _check_shapes(q_ref, k_ref, v_ref, q_gen, k_gen, v_gen, layout)
    if q_ref is None and q_gen is None:
        raise ValueError("sra_reference needs REF or GEN queries")
    t = layout.tokens_per_frame
    k = k_ref if k_gen is None else jnp.concatenate([k_ref, k_gen], axis=1)
    v = v_ref if v_gen is None else jnp.concatenate([v_ref, v_gen], axis=1)
    queries = [x for x in (q_ref, q_gen) if x is not None]
    q = jnp.concatenate(queries, axis=1) if len(queries) > 1 else queries[0]
    row0 = layout.ref_len if q_ref is None else 0

    ranges = jnp.asarray(layout.key_ranges()[row0:row0 + q.shape[1]])     # [S_q, 4]
    keys = jnp.arange(k.shape[1])[None, None, :]
    ref_hi = jnp.broadcast_to(ranges[None, :, 1:2], (q.shape[0], q.shape[1], 1))
    if ref_valid_frames is not None:
        is_gen = (jnp.arange(q.shape[1]) + row0 >= layout.ref_len)[None, :, None]
        limit = jnp.asarray(ref_valid_frames, jnp.int32)[:, None, None] * t
        ref_hi = jnp.where(is_gen, jnp.minimum(ref_hi, limit), ref_hi)
    mask = (((keys >= ranges[None, :, 0:1]) & (keys < ref_hi))
            | ((keys >= ranges[None, :, 2:3]) & (keys < ranges[None, :, 3:4])))  # [B, Sq, Sk]

    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    logits = jnp.where(mask[:, None], logits, _NEG)
    lse = jax.nn.logsumexp(logits, axis=-1)
    probs = jnp.exp(logits - lse[..., None])
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32)).astype(q.dtype)

    n_ref = 0 if q_ref is None else layout.ref_len
    o_ref = None if q_ref is None else out[:, :n_ref]
    o_gen = None if q_gen is None else out[:, n_ref:]
    if not return_lse:
        return o_ref, o_gen
    lse_ref = None if q_ref is None else lse[:, :, :n_ref]
    lse_gen = None if q_gen is None else lse[:, :, n_ref:]
    return (o_ref, o_gen), (lse_ref, lse_gen)


def _check_shapes(q_ref, k_ref, v_ref, q_gen, k_gen, v_gen, layout: SRALayout):
    expect = {"q_ref": layout.ref_len, "k_ref": layout.ref_len, "v_ref": layout.ref_len,
              "q_gen": layout.gen_len, "k_gen": layout.gen_len, "v_gen": layout.gen_len}
    arrays = {"q_ref": q_ref, "k_ref": k_ref, "v_ref": v_ref, "q_gen": q_gen, "k_gen": k_gen,
              "v_gen": v_gen}
    for name, arr in arrays.items():
        if arr is None:
            if name in ("k_ref", "v_ref"):
                raise ValueError(f"{name} is required (use a zero-length array for no REF)")
            continue
        if arr.ndim != 4 or arr.shape[1] != expect[name]:
            raise ValueError(f"{name} has shape {arr.shape}; expected [B, {expect[name]}, H, D] "
                             f"for {layout}")
    if (q_gen is None) != (k_gen is None) or (k_gen is None) != (v_gen is None):
        raise ValueError("q_gen, k_gen and v_gen must be given together")
