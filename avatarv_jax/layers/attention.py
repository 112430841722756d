"""Attention: the SRA dispatcher and the self-/cross-attention modules of the DiT.

``attention_impl`` in the model config picks the Sparse Reference Attention implementation:
``xla`` (dense mask, always available, the ground truth), ``pallas`` (the block-sparse kernel
in ``avatarv_jax.kernels``) or ``cudnn`` (the rule split into dense library attention calls,
cuDNN's fused kernels on a GPU); the kernel modules register themselves on first use. Every
implementation takes REF and GEN keys/values as separate arrays, so a ``RefCache`` is used
without copying.
"""

from __future__ import annotations

import importlib
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from avatarv_jax.kernels.sra_layout import SRALayout
from avatarv_jax.kernels.sra_reference import sra_reference
from avatarv_jax.layers.linear import Dense
from avatarv_jax.layers.norms import RMSNorm
from avatarv_jax.layers.rope import apply_rope
from avatarv_jax.parallel.ulysses import maybe_ulysses

_IMPLS: dict[str, Callable] = {"xla": sra_reference}
# Implementations that live in optional kernel modules, imported on first use.
_LAZY_IMPLS = {"pallas": "avatarv_jax.kernels.sra_pallas",
               "cudnn": "avatarv_jax.kernels.sra_cudnn"}


def register_attention_impl(name: str, fn: Callable) -> None:
    """Make ``fn`` (same signature as ``sra_reference``) selectable as ``attention_impl=name``."""
    _IMPLS[name] = fn


def get_attention_impl(name: str) -> Callable:
    if name not in _IMPLS and name in _LAZY_IMPLS:
        try:
            importlib.import_module(_LAZY_IMPLS[name])  # registers itself on import
        except ModuleNotFoundError:
            pass
    if name not in _IMPLS:
        raise ValueError(f"attention_impl {name!r} is not available; available: "
                         f"{sorted(_IMPLS)}")
    return _IMPLS[name]


def sparse_reference_attention(q_ref, k_ref, v_ref, q_gen, k_gen, v_gen, *, layout: SRALayout,
                               ref_valid_frames=None, impl: str = "xla"):
    """SRA over separate REF and GEN inputs; returns (o_ref or None, o_gen).

    Inside ``use_rules`` with a ``sequence`` mesh axis > 1 it runs as Ulysses sequence
    parallelism (``parallel/ulysses.py``)."""
    fn = maybe_ulysses(get_attention_impl(impl))
    return fn(q_ref, k_ref, v_ref, q_gen, k_gen, v_gen, layout=layout,
              ref_valid_frames=ref_valid_frames)


def dot_product_attention(q, k, v, key_mask=None):
    """Plain attention [B, Sq, H, D] x [B, Sk, H, D]; softmax in fp32; key_mask [B, Sk]."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
    logits = logits * q.shape[-1] ** -0.5
    if key_mask is not None:
        logits = jnp.where(key_mask[:, None, None, :], logits, -1e30)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32)).astype(q.dtype)


class AttentionProjections(nnx.Module):
    """q/k/v/out projections with RMS-norm of q and k across all heads (Wan 2.1 attention)."""

    def __init__(self, dim: int, num_heads: int, *, kv_dim: int | None = None, eps: float = 1e-6,
                 dtype=jnp.float32, zero_out: bool = False, rngs: nnx.Rngs):
        kv_dim = dim if kv_dim is None else kv_dim
        self.num_heads = num_heads
        self.to_q = Dense(dim, dim, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.to_k = Dense(kv_dim, dim, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.to_v = Dense(kv_dim, dim, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        out_init = nnx.initializers.zeros_init() if zero_out else nnx.initializers.xavier_uniform()
        self.to_out = Dense(dim, dim, axes=("heads", "embed"), dtype=dtype, kernel_init=out_init,
                            rngs=rngs)
        self.norm_q = RMSNorm(dim, eps=eps, axis_name="heads", rngs=rngs)
        self.norm_k = RMSNorm(dim, eps=eps, axis_name="heads", rngs=rngs)

    def _heads(self, x):
        return x.reshape(*x.shape[:-1], self.num_heads, x.shape[-1] // self.num_heads)

    def query(self, x, rope=None):
        q = self._heads(self.norm_q(self.to_q(x)))
        return q if rope is None else apply_rope(q, *rope)

    def key_value(self, x, rope=None):
        k = self._heads(self.norm_k(self.to_k(x)))
        v = self._heads(self.to_v(x))
        return (k if rope is None else apply_rope(k, *rope)), v

    def output(self, o):
        return self.to_out(o.reshape(*o.shape[:-2], -1))
