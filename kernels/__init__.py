"""Attention kernels of avatarv-jax, installed as ``avatarv_jax.kernels``.

Each kernel sits beside its pure-JAX reference:

- ``sra_layout``: the Sparse Reference Attention rule (DESIGN §3.1) as data: which key
  ranges each query may see, the dense mask, and the allowed-pair count.
- ``sra_reference``: dense-mask attention over separate REF and GEN inputs; the ground truth
  for every faster implementation (the Pallas kernel plugs in beside it).
"""

from avatarv_jax.kernels.sra_layout import SRALayout
from avatarv_jax.kernels.sra_reference import sra_reference

__all__ = ["SRALayout", "sra_reference"]
