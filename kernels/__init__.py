"""Attention kernels of avatarv-jax, installed as ``avatarv_jax.kernels``.

Each kernel sits beside its pure-JAX reference:

- ``sra_layout``: the Sparse Reference Attention rule (DESIGN §3.1) as data: which key
  ranges each query may see, the dense mask, and the allowed-pair count.
- ``sra_reference``: dense-mask attention over separate REF and GEN inputs; the ground truth
  for every faster implementation.
- ``sra_blocks``: static block tables per (query segment, key segment): per-row token ranges,
  the run of key blocks each query block visits, and the transposed runs for the backward.
- ``sra_pallas``: the block-sparse flash SRA kernel (Triton lowering, any NVIDIA GPU), forward
  and ``custom_vjp`` backward; registers ``attention_impl="pallas"`` on import.
- ``sra_tpu``: the Mosaic TPU variant, with the block tables as scalar prefetch.
- ``sra_cudnn``: the rule (default windows) as dense ``jax.nn.dot_product_attention`` calls,
  cuDNN's flash kernels on a GPU; registers ``attention_impl="cudnn"`` on import.

On CPU every kernel runs in Pallas interpret mode (chosen automatically).
"""

from avatarv_jax.kernels.sra_layout import SRALayout
from avatarv_jax.kernels.sra_reference import sra_reference

__all__ = ["SRALayout", "sra_reference"]
