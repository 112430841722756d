"""Sparse Reference Attention composed of dense library attention calls (cuDNN on GPU).

With the default windows (``ref_window`` 0 or all, ``gen_window`` all) the SRA rule splits into
dense problems that a library flash-attention kernel solves exactly:

- REF rows: attention within each latent frame (the frames become the batch), or over all of
  REF when ``ref_window = -1``;
- GEN rows: attention over every GEN key and every valid REF key. The keys are ordered
  ``[GEN | REF]`` so that the valid REF frames (a prefix of REF) followed by the invalid ones
  become a padded tail: ``key_value_seq_lengths = gen_len + valid_frames * tokens`` masks them.

Each part is one ``jax.nn.dot_product_attention`` call, with cuDNN's fused kernels (forward and
backward) on a GPU and JAX's XLA path elsewhere, which is how the CPU tests check the
composition against ``sra_reference``. Sequences are padded to an even length, padded keys
masked by ``key_value_seq_lengths``: JAX (0.10, 0.11) refuses odd lengths in cuDNN's training
path (its forward rule treats the placeholder bias as a bias), and a frame here has an odd
token count (1,560 patches + the motion token). It costs one concatenation of GEN and REF
keys/values per layer. Windowed GEN attention (the SR refiner) and finite ``ref_window > 0``
are not dense problems: use ``attention_impl="pallas"`` there. Importing this module registers
it as ``attention_impl="cudnn"``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from avatarv_jax.kernels.sra_layout import SRALayout
from avatarv_jax.kernels.sra_reference import _check_shapes

_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def _implementation(dtype, implementation: str | None) -> str:
    """cuDNN on a GPU (which needs half precision), XLA elsewhere; never a silent dense path."""
    if implementation is None:
        implementation = "cudnn" if jax.default_backend() == "gpu" else "xla"
    if implementation == "cudnn" and dtype not in _CUDNN_DTYPES:
        raise ValueError(f"attention_impl='cudnn' needs bfloat16 or float16 inputs on a GPU, got "
                         f"{jnp.dtype(dtype).name}; set model.dtype='bfloat16' or use "
                         "attention_impl='pallas'")
    return implementation


def _pad_even(x):
    """Pad the sequence axis of [B, S, H, D] to an even length (zeros)."""
    if x.shape[1] % 2 == 0:
        return x
    return jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0)))


def sra_cudnn(q_ref, k_ref, v_ref, q_gen, k_gen, v_gen, *, layout: SRALayout,
              ref_valid_frames=None, implementation: str | None = None):
    """SRA as dense attention calls; same arguments and results as ``sra_reference``.

    ``implementation`` ("cudnn" or "xla") defaults to cuDNN on a GPU and XLA elsewhere.
    """
    _check_shapes(q_ref, k_ref, v_ref, q_gen, k_gen, v_gen, layout)
    if q_ref is None and q_gen is None:
        raise ValueError("sra_cudnn needs REF or GEN queries")
    if layout.gen_window != -1:
        raise ValueError(f"attention_impl='cudnn' covers gen_window=-1 only, got "
                         f"{layout.gen_window} (the SR refiner's windowed attention): use "
                         "attention_impl='pallas' or 'xla'")
    if layout.ref_window not in (0, -1) and layout.ref_frames > 1:
        raise ValueError(f"attention_impl='cudnn' covers ref_window 0 or -1 only, got "
                         f"{layout.ref_window}: use attention_impl='pallas' or 'xla'")
    dtype = (q_gen if q_gen is not None else q_ref).dtype
    impl = _implementation(dtype, implementation)

    def attend(q, k, v, kv_lengths=None):
        """Dense attention of q over the first ``kv_lengths`` keys, at even lengths."""
        n_q, n_k = q.shape[1], k.shape[1]
        if kv_lengths is None and n_k % 2:
            kv_lengths = jnp.full((k.shape[0],), n_k, jnp.int32)
        q, k, v = _pad_even(q), _pad_even(k), _pad_even(v)
        q_lengths = None
        if kv_lengths is not None:
            q_lengths = jnp.full((q.shape[0],), q.shape[1], jnp.int32)
        o = jax.nn.dot_product_attention(q, k, v, query_seq_lengths=q_lengths,
                                         key_value_seq_lengths=kv_lengths, implementation=impl)
        return o[:, :n_q]

    o_ref = None
    if q_ref is not None:
        if layout.ref_len == 0:
            o_ref = q_ref
        elif layout.ref_window == 0:
            b, _, h, d = q_ref.shape
            t = layout.tokens_per_frame

            def per_frame(x):
                return x.reshape(b * layout.ref_frames, t, h, d)
            o_ref = attend(per_frame(q_ref), per_frame(k_ref), per_frame(v_ref))
            o_ref = o_ref.reshape(q_ref.shape)
        else:
            o_ref = attend(q_ref, k_ref, v_ref)

    o_gen = None
    if q_gen is not None:
        if layout.ref_len == 0:
            o_gen = attend(q_gen, k_gen, v_gen)
        else:
            # One copy: [GEN | REF], plus a zero key when the total is odd (masked below).
            n_keys = layout.gen_len + layout.ref_len
            pad = [jnp.zeros_like(k_gen[:, :1])] if n_keys % 2 else []
            k = jnp.concatenate([k_gen, k_ref.astype(k_gen.dtype)] + pad, axis=1)
            v = jnp.concatenate([v_gen, v_ref.astype(v_gen.dtype)] + pad, axis=1)
            lengths = jnp.full((q_gen.shape[0],), n_keys, jnp.int32) if pad else None
            if ref_valid_frames is not None:
                valid = jnp.broadcast_to(jnp.asarray(ref_valid_frames, jnp.int32),
                                         (q_gen.shape[0],))
                ref_keys = jnp.clip(valid * layout.tokens_per_frame, 0, layout.ref_len)
                lengths = layout.gen_len + ref_keys
            o_gen = attend(q_gen, k, v, lengths)
    return o_ref, o_gen


def _register():
    from avatarv_jax.layers.attention import register_attention_impl
    register_attention_impl("cudnn", sra_cudnn)


_register()
