"""Sparse Reference Attention as a block-sparse Pallas kernel, forward and backward.

Flash attention (online softmax, fp32 accumulation) in which each query block loops only over
the key blocks of its allowed ranges (at most one run in REF and one in GEN, DESIGN §3.1),
from the static tables of ``sra_blocks``; rows are masked token-exactly inside partial blocks.
REF keys/values (possibly a ``RefCache``) and GEN keys/values are separate kernel inputs, so
nothing is concatenated; each segment is padded to whole blocks inside.

One ``pallas_call`` per query segment (REF rows see REF; GEN rows see REF then GEN). The
backward (``jax.custom_vjp``) runs a dQ kernel over the same blocks and, per key segment, a
dK/dV kernel that loops over the query blocks of the transposed table. ``ref_valid_frames``
arrives as a per-batch scalar input that clamps the REF range of GEN rows at run time (no
recompilation per value).

Backends: ``"gpu"`` (this module) is written for Pallas's Triton lowering, which runs on every
NVIDIA GPU including Hopper; ``"tpu"`` (``sra_tpu``) is the Mosaic variant with the tables as
scalar prefetch. Both share the tables, the custom_vjp below and the tests; on CPU they run in
interpret mode (chosen automatically). Importing this module registers it as
``attention_impl="pallas"``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from avatarv_jax.kernels.sra_blocks import GEN, REF, source_tables, sources_of
from avatarv_jax.kernels.sra_layout import SRALayout
from avatarv_jax.kernels.sra_reference import _check_shapes

_NEG = -1e30           # finite "minus infinity": masked logits, running max of empty rows
_MIN_BLOCK = 16        # Triton's smallest dot tile
_LOG2E = 1.4426950408889634   # softmax in base 2: exp2 is one fast instruction on the GPU
_LN2 = 0.6931471805599453


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two), each capped by the padded segment length, and the GPU's
    warps and pipeline stages of the forward and the backward kernels.

    The defaults are the fastest of ``benchmarks/sra_kernel.py --tune`` on an H100 at head
    dim 128 (bf16, GEN 32,760 tokens; results/sra_kernel_nvidia_h100_80gb_hbm3_tuned.json).
    """
    block_q: int = 128
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: int | None = 4        # GPU only; None: 4 for head dim <= 64, else 8
    num_stages: int = 2
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2

    def __post_init__(self):
        for f in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
            v = getattr(self, f)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{f} must be a power of two, got {v}")


TPU_BLOCK_SIZES = BlockSizes(block_q=256, block_k=512, block_q_bwd=256, block_k_bwd=256)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernels specialise on (hashable: a custom_vjp non-diff argument)."""
    layout: SRALayout
    blocks: BlockSizes
    interpret: bool
    head_dim: int
    backend: str = "gpu"             # "gpu": Triton-style kernels; "tpu": Mosaic (sra_tpu)

    def block(self, segment: str, kind: str, backward: bool) -> int:
        """The tile along ``segment`` used as a query ("q") or key ("k") axis."""
        b = self.blocks
        size = {("q", False): b.block_q, ("k", False): b.block_k,
                ("q", True): b.block_q_bwd, ("k", True): b.block_k_bwd}[kind, backward]
        n = self.layout.ref_len if segment == REF else self.layout.gen_len
        smallest = _MIN_BLOCK if self.backend == "gpu" else 8   # Triton dot / TPU sublanes
        return min(size, max(smallest, pl.next_power_of_2(max(n, 1))))

    @property
    def padded_dim(self) -> int:
        return max(_MIN_BLOCK, pl.next_power_of_2(self.head_dim))

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5


# ----------------------------------------------------------------------------- helpers

def _pad_tokens(x, multiple: int, dim: int):
    """[B, S, H, D] -> [B, ceil(S / multiple) * multiple, H, dim], zero padded."""
    pad_s = -x.shape[1] % multiple
    pad_d = dim - x.shape[3]
    if pad_s or pad_d:
        x = jnp.pad(x, ((0, 0), (0, pad_s), (0, 0), (0, pad_d)))
    return x


def _pad_rows(x, multiple: int):
    """[B, H, S] -> [B, H, padded S]."""
    pad_s = -x.shape[2] % multiple
    return jnp.pad(x, ((0, 0), (0, 0), (0, pad_s))) if pad_s else x


def _precision(a):
    """fp32 operands: exact (IEEE) products; the default would round them to TF32 on GPU."""
    return lax.Precision.HIGHEST if a.dtype == jnp.float32 else None


def _dot_nt(a, b):
    """a @ b.T with fp32 accumulation."""
    return jnp.dot(a, b.T, preferred_element_type=jnp.float32, precision=_precision(a))


def _dot_nn(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=_precision(a))


def _dot_tn(a, b):
    """a.T @ b with fp32 accumulation."""
    return jnp.dot(a.T, b, preferred_element_type=jnp.float32, precision=_precision(a))


def _row_mask(start, size, row_lo, row_hi):
    """[rows, size] True where key ``start + c`` lies in the row's range ``[lo, hi)``."""
    pos = start + lax.broadcasted_iota(jnp.int32, (1, size), 1)
    return (pos >= row_lo[:, None]) & (pos < row_hi[:, None])


def _compiler_params(st: _Static, backward: bool):
    if st.interpret:
        return None
    b = st.blocks
    if backward:
        return pltriton.CompilerParams(num_warps=b.num_warps_bwd, num_stages=b.num_stages_bwd)
    warps = b.num_warps or (4 if st.padded_dim <= 64 else 8)
    return pltriton.CompilerParams(num_warps=warps, num_stages=b.num_stages)


def _row_specs(rows: np.ndarray, block: int | None):
    """Row-range arrays (lo, hi) as kernel inputs: a block of rows, or all rows (block None)."""
    lo, hi = jnp.asarray(rows[:, 0]), jnp.asarray(rows[:, 1])
    if block is None:
        spec = pl.BlockSpec((rows.shape[0],), lambda i, b, h: (0,))
    else:
        spec = pl.BlockSpec((block,), lambda i, b, h: (i,))
    return [lo, hi], [spec, spec]


# ----------------------------------------------------------------------------- forward

def _runs(table_ref, clamp, limit, bk):
    """(first, a, b, last): key blocks [first, last) to visit, [a, b) of them unmasked.

    The table row holds the static run and its interior; the REF limit of GEN rows
    (``ref_valid_frames``) shortens both at run time.
    """
    first, last, a, b = table_ref[0], table_ref[1], table_ref[2], table_ref[3]
    if clamp:
        last = jnp.minimum(last, lax.div(limit + bk - 1, bk))
        b = jnp.minimum(b, lax.div(limit, bk))
    a = jnp.minimum(a, last)
    return first, a, jnp.minimum(jnp.maximum(b, a), last), last


def _forward_kernel(*refs, clamped, block_k, scale, count):
    """One query block: online softmax (base 2) over the key blocks of each source's range;
    only the blocks at the edges of a range pay for the token mask."""
    it = iter(refs)
    q_ref = next(it)
    sources = [tuple(next(it) for _ in range(5)) for _ in clamped]  # k, v, table, lo, hi
    limit_ref = next(it) if any(clamped) else None
    o_ref, lse_ref = next(it), next(it)
    count_ref = next(it) if count else None

    q = q_ref[...]
    rows = q.shape[0]
    carry = (jnp.full((rows,), _NEG, jnp.float32), jnp.zeros((rows,), jnp.float32),
             jnp.zeros(q.shape, jnp.float32))
    visited = jnp.int32(0)
    for (k_ref, v_ref, table_ref, lo_ref, hi_ref), clamp, bk in zip(sources, clamped, block_k):
        row_lo, row_hi = lo_ref[...], hi_ref[...]
        limit = limit_ref[0] if clamp else None
        if clamp:                                   # ref_valid_frames: REF cut for GEN rows
            row_hi = jnp.minimum(row_hi, limit)
        first, a, b, last = _runs(table_ref, clamp, limit, bk)

        def body(j, carry, masked, k_ref=k_ref, v_ref=v_ref, row_lo=row_lo, row_hi=row_hi,
                 bk=bk):
            m_prev, l_prev, acc = carry
            start = j * bk
            k = k_ref[pl.ds(start, bk), :]
            v = v_ref[pl.ds(start, bk), :]
            s = _dot_nt(q, k) * (scale * _LOG2E)
            if masked:
                mask = _row_mask(start, bk, row_lo, row_hi)
                s = jnp.where(mask, s, _NEG)
            m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
            correction = jnp.exp2(m_prev - m_next)
            p = jnp.exp2(s - m_next[:, None])
            if masked:
                p = jnp.where(mask, p, 0.0)
            l_next = l_prev * correction + jnp.sum(p, axis=1)
            acc = acc * correction[:, None] + _dot_nn(p.astype(v.dtype), v)
            return m_next, l_next, acc

        carry = lax.fori_loop(first, a, functools.partial(body, masked=True), carry)
        carry = lax.fori_loop(a, b, functools.partial(body, masked=False), carry)
        carry = lax.fori_loop(b, last, functools.partial(body, masked=True), carry)
        visited = visited + jnp.maximum(last - first, 0)

    m, denom, acc = carry
    seen = denom > 0.0                               # padding rows see nothing
    l_safe = jnp.where(seen, denom, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m * _LN2 + jnp.log(l_safe), _NEG)
    if count_ref is not None:
        count_ref[...] = jnp.full(count_ref.shape, visited, jnp.int32)


def _add_key_operands(st: _Static, query: str, bq: int, kv: dict, limit, inputs: list,
                      specs: list, *, backward: bool):
    """Appends, per key segment a query segment sees, the padded K/V, its block table and row
    ranges (and the REF limit when any range is clamped); returns (clamped, block_k) per segment.

    The forward and dQ kernels read their key operands in this same order.
    """
    dp = st.padded_dim
    clamped, block_k = [], []
    for source in sources_of(st.layout, query):
        bk = st.block(source, "k", backward=backward)
        tab = source_tables(st.layout, query, source, bq, bk)
        k, v = (_pad_tokens(x, bk, dp) for x in kv[source])
        full = pl.BlockSpec((None, k.shape[1], None, dp), lambda i, b, h: (b, 0, h, 0))
        row_arrays, row_specs = _row_specs(tab.rows, bq)
        table = np.concatenate([tab.blocks, tab.interior], axis=1)
        inputs += [k, v, jnp.asarray(table)] + row_arrays
        specs += [full, full, pl.BlockSpec((None, 4), lambda i, b, h: (i, 0))] + row_specs
        clamped.append(tab.clamped)
        block_k.append(bk)
    if any(clamped):
        inputs.append(limit)
        specs.append(pl.BlockSpec((1,), lambda i, b, h: (b,)))
    return clamped, block_k


def _forward_segment(st: _Static, query: str, q, kv: dict, limit, *, count: bool = False):
    """Output [B, S_q, H, D] and log-sum-exp [B, H, S_q] of one query segment."""
    batch, n_q, heads, _ = q.shape
    dp = st.padded_dim
    bq = st.block(query, "q", backward=False)
    qp = _pad_tokens(q, bq, dp)
    num_qb = qp.shape[1] // bq
    inputs = [qp]
    specs = [pl.BlockSpec((None, bq, None, dp), lambda i, b, h: (b, i, h, 0))]
    clamped, block_k = _add_key_operands(st, query, bq, kv, limit, inputs, specs, backward=False)

    out_shape = [jax.ShapeDtypeStruct(qp.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, qp.shape[1]), jnp.float32)]
    out_specs = [pl.BlockSpec((None, bq, None, dp), lambda i, b, h: (b, i, h, 0)),
                 pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))]
    if count:
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, num_qb), jnp.int32))
        out_specs.append(pl.BlockSpec((None, None, 1), lambda i, b, h: (b, h, i)))
    kernel = functools.partial(_forward_kernel, clamped=tuple(clamped), block_k=tuple(block_k),
                               scale=st.scale, count=count)
    outs = pl.pallas_call(
        kernel, grid=(num_qb, batch, heads), in_specs=specs, out_specs=out_specs,
        out_shape=out_shape, compiler_params=_compiler_params(st, backward=False),
        interpret=st.interpret,
        name=f"sra_forward_{query}")(*inputs)
    o, lse = outs[0][:, :n_q, :, :st.head_dim], outs[1][:, :, :n_q]
    return (o, lse, outs[2]) if count else (o, lse)


# ----------------------------------------------------------------------------- backward

def _dq_kernel(*refs, clamped, block_k, scale):
    """dQ of one query block over the same key blocks (and unmasked interiors) as the forward."""
    it = iter(refs)
    q_ref, do_ref, lse_ref, delta_ref = next(it), next(it), next(it), next(it)
    sources = [tuple(next(it) for _ in range(5)) for _ in clamped]
    limit_ref = next(it) if any(clamped) else None
    dq_ref = next(it)

    q, do = q_ref[...], do_ref[...]
    lse2, delta = lse_ref[...] * _LOG2E, delta_ref[...]
    dq = jnp.zeros(q.shape, jnp.float32)
    for (k_ref, v_ref, table_ref, lo_ref, hi_ref), clamp, bk in zip(sources, clamped, block_k):
        row_lo, row_hi = lo_ref[...], hi_ref[...]
        limit = limit_ref[0] if clamp else None
        if clamp:
            row_hi = jnp.minimum(row_hi, limit)
        first, a, b, last = _runs(table_ref, clamp, limit, bk)

        def body(j, dq, masked, k_ref=k_ref, v_ref=v_ref, row_lo=row_lo, row_hi=row_hi, bk=bk):
            start = j * bk
            k = k_ref[pl.ds(start, bk), :]
            v = v_ref[pl.ds(start, bk), :]
            p = jnp.exp2(_dot_nt(q, k) * (scale * _LOG2E) - lse2[:, None])
            if masked:
                p = jnp.where(_row_mask(start, bk, row_lo, row_hi), p, 0.0)
            ds = p * (_dot_nt(do, v) - delta[:, None])
            return dq + _dot_nn(ds.astype(k.dtype), k)

        dq = lax.fori_loop(first, a, functools.partial(body, masked=True), dq)
        dq = lax.fori_loop(a, b, functools.partial(body, masked=False), dq)
        dq = lax.fori_loop(b, last, functools.partial(body, masked=True), dq)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, clamped, block_q, block_k, scale):
    """dK, dV of one key block over the query blocks (of each query segment) that see it;
    the mask only where the key block is not inside every row's range."""
    it = iter(refs)
    k_ref, v_ref = next(it), next(it)
    queries = [tuple(next(it) for _ in range(7)) for _ in clamped]  # q do lse delta tab lo hi
    limit_ref = next(it) if any(clamped) else None
    dk_ref, dv_ref = next(it), next(it)

    k, v = k_ref[...], v_ref[...]
    key_start = pl.program_id(0) * block_k
    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    for (q_ref, do_ref, lse_ref, delta_ref, table_ref, lo_ref, hi_ref), clamp, bq in zip(
            queries, clamped, block_q):
        first, last, a, b = table_ref[0], table_ref[1], table_ref[2], table_ref[3]
        limit = None
        if clamp:                  # a REF block past the limit: no GEN row; across it: masked
            limit = limit_ref[0]
            last = jnp.where(key_start < limit, last, first)
            b = jnp.where(key_start + block_k <= limit, b, a)
        a = jnp.minimum(jnp.maximum(a, first), last)
        b = jnp.minimum(jnp.maximum(b, a), last)

        def body(i, carry, masked, q_ref=q_ref, do_ref=do_ref, lse_ref=lse_ref,
                 delta_ref=delta_ref, lo_ref=lo_ref, hi_ref=hi_ref, limit=limit, bq=bq):
            dk, dv = carry
            rows = pl.ds(i * bq, bq)
            q, do = q_ref[rows, :], do_ref[rows, :]
            lse2, delta = lse_ref[rows] * _LOG2E, delta_ref[rows]
            p = jnp.exp2(_dot_nt(q, k) * (scale * _LOG2E) - lse2[:, None])
            if masked:
                row_lo, row_hi = lo_ref[rows], hi_ref[rows]
                if limit is not None:
                    row_hi = jnp.minimum(row_hi, limit)
                p = jnp.where(_row_mask(key_start, block_k, row_lo, row_hi), p, 0.0)
            dv = dv + _dot_tn(p.astype(do.dtype), do)
            ds = p * (_dot_nt(do, v) - delta[:, None])
            dk = dk + _dot_tn(ds.astype(q.dtype), q)
            return dk, dv

        carry = lax.fori_loop(first, a, functools.partial(body, masked=True), carry)
        carry = lax.fori_loop(a, b, functools.partial(body, masked=False), carry)
        carry = lax.fori_loop(b, last, functools.partial(body, masked=True), carry)
    dk, dv = carry
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_segment(st: _Static, query: str, q, do, lse, delta, kv: dict, limit):
    batch, n_q, heads, _ = q.shape
    dp = st.padded_dim
    bq = st.block(query, "q", backward=True)
    qp, dop = _pad_tokens(q, bq, dp), _pad_tokens(do, bq, dp)
    lse, delta = _pad_rows(lse, bq), _pad_rows(delta, bq)
    num_qb = qp.shape[1] // bq
    row_block = pl.BlockSpec((None, bq, None, dp), lambda i, b, h: (b, i, h, 0))
    vec_block = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    inputs, specs = [qp, dop, lse, delta], [row_block, row_block, vec_block, vec_block]
    clamped, block_k = _add_key_operands(st, query, bq, kv, limit, inputs, specs, backward=True)
    kernel = functools.partial(_dq_kernel, clamped=tuple(clamped), block_k=tuple(block_k),
                               scale=st.scale)
    dq = pl.pallas_call(
        kernel, grid=(num_qb, batch, heads), in_specs=specs, out_specs=row_block,
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        compiler_params=_compiler_params(st, backward=True), interpret=st.interpret,
        name=f"sra_dq_{query}")(*inputs)
    return dq[:, :n_q, :, :st.head_dim]


def _dkv_segment(st: _Static, source: str, k, v, per_query: dict, limit):
    """dK, dV of one key segment; ``per_query[query] = (q, do, lse, delta)``."""
    batch, n_k, heads, _ = k.shape
    dp = st.padded_dim
    bk = st.block(source, "k", backward=True)
    kp, vp = _pad_tokens(k, bk, dp), _pad_tokens(v, bk, dp)
    num_kb = kp.shape[1] // bk
    key_block = pl.BlockSpec((None, bk, None, dp), lambda j, b, h: (b, j, h, 0))
    inputs, specs = [kp, vp], [key_block, key_block]
    clamped, block_q = [], []
    for query, (q, do, lse, delta) in per_query.items():
        bq = st.block(query, "q", backward=True)
        tab = source_tables(st.layout, query, source, bq, bk)
        qp, dop = _pad_tokens(q, bq, dp), _pad_tokens(do, bq, dp)
        full = pl.BlockSpec((None, qp.shape[1], None, dp), lambda j, b, h: (b, 0, h, 0))
        vec = pl.BlockSpec((None, None, qp.shape[1]), lambda j, b, h: (b, h, 0))
        row_arrays, row_specs = _row_specs(tab.rows, None)
        table = np.concatenate([tab.transposed, tab.transposed_interior], axis=1)
        inputs += [qp, dop, _pad_rows(lse, bq), _pad_rows(delta, bq),
                   jnp.asarray(table)] + row_arrays
        specs += [full, full, vec, vec,
                  pl.BlockSpec((None, 4), lambda j, b, h: (j, 0))] + row_specs
        clamped.append(tab.clamped)
        block_q.append(bq)
    if any(clamped):
        inputs.append(limit)
        specs.append(pl.BlockSpec((1,), lambda j, b, h: (b,)))
    kernel = functools.partial(_dkv_kernel, clamped=tuple(clamped), block_q=tuple(block_q),
                               block_k=bk, scale=st.scale)
    dk, dv = pl.pallas_call(
        kernel, grid=(num_kb, batch, heads), in_specs=specs, out_specs=[key_block, key_block],
        out_shape=[jax.ShapeDtypeStruct(kp.shape, k.dtype),
                   jax.ShapeDtypeStruct(vp.shape, v.dtype)],
        compiler_params=_compiler_params(st, backward=True), interpret=st.interpret,
        name=f"sra_dkv_{source}")(*inputs)
    return dk[:, :n_k, :, :st.head_dim], dv[:, :n_k, :, :st.head_dim]


# ----------------------------------------------------------------------------- custom_vjp

def _segment_kernels(st: _Static):
    """(forward, dq, dkv) segment functions of the static config's backend."""
    if st.backend == "tpu":
        from avatarv_jax.kernels import sra_tpu
        return sra_tpu.forward_segment, sra_tpu.dq_segment, sra_tpu.dkv_segment
    return _forward_segment, _dq_segment, _dkv_segment


def _forward_all(st: _Static, q_ref, k_ref, v_ref, q_gen, k_gen, v_gen, limit):
    forward_segment = _segment_kernels(st)[0]
    kv = {REF: (k_ref, v_ref), GEN: (k_gen, v_gen)}
    outs = {}
    for query, q in ((REF, q_ref), (GEN, q_gen)):
        if q is None:
            outs[query] = (None, None)
        elif q.shape[1] == 0:
            outs[query] = (q, jnp.zeros((q.shape[0], q.shape[2], 0), jnp.float32))
        else:
            outs[query] = forward_segment(st, query, q, kv, limit)
    return outs[REF][0], outs[GEN][0], outs[REF][1], outs[GEN][1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sra(st, q_ref, k_ref, v_ref, q_gen, k_gen, v_gen, limit):
    return _forward_all(st, q_ref, k_ref, v_ref, q_gen, k_gen, v_gen, limit)


def _sra_fwd(st, q_ref, k_ref, v_ref, q_gen, k_gen, v_gen, limit):
    outs = _forward_all(st, q_ref, k_ref, v_ref, q_gen, k_gen, v_gen, limit)
    return outs, (q_ref, k_ref, v_ref, q_gen, k_gen, v_gen, limit) + outs


def _sra_bwd(st, residuals, cotangents):
    q_ref, k_ref, v_ref, q_gen, k_gen, v_gen, limit, o_ref, o_gen, lse_ref, lse_gen = residuals
    do_ref, do_gen, dlse_ref, dlse_gen = cotangents
    _, dq_segment, dkv_segment = _segment_kernels(st)
    kv = {REF: (k_ref, v_ref), GEN: (k_gen, v_gen)}
    per_query, dq = {}, {REF: None, GEN: None}
    for query, q, o, lse, do, dlse in ((REF, q_ref, o_ref, lse_ref, do_ref, dlse_ref),
                                       (GEN, q_gen, o_gen, lse_gen, do_gen, dlse_gen)):
        if q is None:
            continue
        if q.shape[1] == 0:
            dq[query] = jnp.zeros_like(q)
            continue
        do = jnp.zeros_like(q) if do is None else do.astype(q.dtype)
        # delta_i = sum_d o_id do_id; the LSE's own cotangent enters as dS += P * dLSE.
        delta = jnp.einsum("bqhd,bqhd->bhq", o.astype(jnp.float32), do.astype(jnp.float32))
        if dlse is not None:
            delta = delta - dlse
        per_query[query] = (q, do, lse, delta)
        dq[query] = dq_segment(st, query, q, do, lse, delta, kv, limit)
    dkv = {REF: (jnp.zeros_like(k_ref), jnp.zeros_like(v_ref)), GEN: (None, None)}
    if k_gen is not None:
        dkv[GEN] = (jnp.zeros_like(k_gen), jnp.zeros_like(v_gen))
    for source in (REF, GEN):
        k, v = kv[source]
        seeing = {query: per_query[query] for query in per_query
                  if source in sources_of(st.layout, query)}
        if k is None or k.shape[1] == 0 or not seeing:
            continue
        dkv[source] = dkv_segment(st, source, k, v, seeing, limit)
    return (dq[REF], *dkv[REF], dq[GEN], *dkv[GEN], None)


_sra.defvjp(_sra_fwd, _sra_bwd)


# ----------------------------------------------------------------------------- public API

def _static(layout: SRALayout, head_dim: int, block_sizes, interpret, backend) -> _Static:
    platform = jax.default_backend()
    if backend is None:
        backend = "tpu" if platform == "tpu" else "gpu"
    if backend not in ("gpu", "tpu"):
        raise ValueError(f"backend must be 'gpu' or 'tpu', got {backend!r}")
    if interpret is None:
        interpret = platform == "cpu"
    if block_sizes is None:
        block_sizes = BlockSizes() if backend == "gpu" else TPU_BLOCK_SIZES
    return _Static(layout, block_sizes, bool(interpret), head_dim, backend)


def _ref_limit(layout: SRALayout, batch: int, ref_valid_frames):
    """[B] int32: REF tokens GEN rows may see (all of REF without ``ref_valid_frames``)."""
    if ref_valid_frames is None:
        return jnp.full((batch,), layout.ref_len, jnp.int32)
    valid = jnp.broadcast_to(jnp.asarray(ref_valid_frames, jnp.int32), (batch,))
    return jnp.clip(valid * layout.tokens_per_frame, 0, layout.ref_len)


def sra_pallas(q_ref, k_ref, v_ref, q_gen, k_gen, v_gen, *, layout: SRALayout,
               ref_valid_frames=None, return_lse: bool = False,
               block_sizes: BlockSizes | None = None, interpret: bool | None = None,
               backend: str | None = None):
    """Block-sparse SRA; same arguments and results as ``sra_reference``.

    ``block_sizes`` tunes the tiles; ``interpret`` defaults to True when JAX's default
    backend is the CPU; ``backend`` ("gpu": Triton-style, "tpu": Mosaic with scalar-prefetched
    block tables) defaults to "tpu" on a TPU and "gpu" elsewhere.
    """
    _check_shapes(q_ref, k_ref, v_ref, q_gen, k_gen, v_gen, layout)
    if q_ref is None and q_gen is None:
        raise ValueError("sra_pallas needs REF or GEN queries")
    head_dim = k_ref.shape[-1]
    for name, x in (("q_ref", q_ref), ("v_ref", v_ref), ("q_gen", q_gen), ("k_gen", k_gen),
                    ("v_gen", v_gen)):
        if x is not None and x.shape[-1] != head_dim:
            raise ValueError(f"{name} has head dim {x.shape[-1]}; k_ref has {head_dim}")
    st = _static(layout, head_dim, block_sizes, interpret, backend)
    limit = _ref_limit(layout, k_ref.shape[0], ref_valid_frames)
    o_ref, o_gen, lse_ref, lse_gen = _sra(st, q_ref, k_ref, v_ref, q_gen, k_gen, v_gen, limit)
    if return_lse:
        return (o_ref, o_gen), (lse_ref, lse_gen)
    return o_ref, o_gen


def visit_counts(q_ref, k_ref, v_ref, q_gen, k_gen, v_gen, *, layout: SRALayout,
                 ref_valid_frames=None, block_sizes: BlockSizes | None = None):
    """Key blocks the forward kernel actually visited, [B, H], counted inside the kernel.

    Runs the forward in interpret mode with a per-program counter output; tests compare it
    with the block-table formula (``sra_blocks.visited_key_blocks``).
    """
    _check_shapes(q_ref, k_ref, v_ref, q_gen, k_gen, v_gen, layout)
    st = _static(layout, k_ref.shape[-1], block_sizes, True, "gpu")
    limit = _ref_limit(layout, k_ref.shape[0], ref_valid_frames)
    kv = {REF: (k_ref, v_ref), GEN: (k_gen, v_gen)}
    total = 0
    for query, q in ((REF, q_ref), (GEN, q_gen)):
        if q is not None and q.shape[1]:
            total = total + _forward_segment(st, query, q, kv, limit, count=True)[2].sum(-1)
    return total


def _register():
    from avatarv_jax.layers.attention import register_attention_impl
    register_attention_impl("pallas", sra_pallas)


_register()
