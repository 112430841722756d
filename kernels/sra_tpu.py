"""The SRA kernels for TPU (Pallas Mosaic): block tables as scalar prefetch.

Same maths and tables as ``sra_pallas`` (which owns the custom_vjp and calls these segment
functions when ``backend="tpu"``), laid out the way Mosaic pipelines work: the inner loop over
visited blocks is a grid axis ("steps"), and the BlockSpec index maps read the block tables
from SMEM (``PrefetchScalarGridSpec``) to pick which key block (forward, dQ) or query block
(dK/dV) is DMA'd for each step. A step walks first through the REF run, then the GEN run;
steps past a block's count are skipped with ``pl.when`` and keep the last block index, so no
extra DMA is issued. Counts of GEN rows over REF are computed per batch element from
``ref_valid_frames`` (data, not shapes: no recompilation).

Arrays are moved to ``[B, H, S, D]`` (Mosaic tiles the last two dims); log-sum-exp, delta and
row ranges travel as ``[..., S, 1]`` columns so they broadcast against ``[rows, keys]`` tiles
without a relayout. Runs on CPU with ``interpret=pltpu.InterpretParams()``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from avatarv_jax.kernels.sra_blocks import source_tables, sources_of

_NEG = -1e30


def _to_bhsd(x, block: int):
    """[B, S, H, D] -> [B, H, S_padded, D]."""
    pad = -x.shape[1] % block
    x = jnp.swapaxes(x, 1, 2)
    return jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) if pad else x


def _column(x, block: int):
    """[B, H, S] -> [B, H, S_padded, 1]."""
    pad = -x.shape[2] % block
    x = jnp.pad(x, ((0, 0), (0, 0), (0, pad))) if pad else x
    return x[..., None]


def _rows(rows: np.ndarray):
    """Row ranges [S_padded, 2] -> (lo, hi) as [S_padded, 1] int32 columns."""
    return jnp.asarray(rows[:, 0:1]), jnp.asarray(rows[:, 1:2])


def _interpret(st):
    return pltpu.InterpretParams() if st.interpret else False


def _params(st):
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _phase_tables(phases, batch: int, limit):
    """Per (batch, outer block) [first, count] of each phase, flattened for SMEM, + steps.

    ``phases``: list of (first [n], count [n], count_at) with ``count_at(limit [B, 1])`` ->
    [B, n] the run-time count under ``ref_valid_frames`` (None: the static count). The step
    axis is sized by the static counts, an upper bound of the run-time ones.
    """
    cols = []
    for first, count, count_at in phases:
        cols.append(jnp.broadcast_to(jnp.asarray(first, jnp.int32), (batch, len(first))))
        dynamic = None if count_at is None else count_at(limit[:, None])
        cols.append(jnp.broadcast_to(jnp.asarray(count, jnp.int32) if dynamic is None
                                     else dynamic.astype(jnp.int32), (batch, len(count))))
    while len(cols) < 4:
        cols.append(jnp.zeros_like(cols[0]))
    steps = int(np.max(sum(np.asarray(count) for _, count, _ in phases)))
    return jnp.stack(cols, axis=-1).reshape(-1), max(steps, 1)


def _ref_cut(first, last, block_k):
    """GEN rows over REF: the key-block run ends at ceil(limit / block_k)."""
    return lambda limit: jnp.maximum(jnp.minimum(last, (limit + block_k - 1) // block_k)
                                     - first, 0)


def _key_cut(count, block_k):
    """dK/dV of REF key block j: GEN rows see it only if j * block_k < limit."""
    start = np.arange(len(count)) * block_k
    return lambda limit: jnp.where(start < limit, count, 0)


def _phase_index(tab_ref, base, phase: int, step):
    """Block index of ``phase`` at ``step``: clamped into the phase's run (no extra DMA)."""
    offset = sum(tab_ref[base + 2 * p + 1] for p in range(phase))
    first, count = tab_ref[base + 2 * phase], tab_ref[base + 2 * phase + 1]
    return first + jnp.clip(step - offset, 0, jnp.maximum(count - 1, 0))


def _phase_active(tab_ref, base, phase: int, step):
    offset = sum(tab_ref[base + 2 * p + 1] for p in range(phase))
    local = step - offset
    return (local >= 0) & (local < tab_ref[base + 2 * phase + 1]), local


def _mask(start, size, lo_ref, hi_ref, limit_ref, b, clamp: bool):
    """Keys ``start .. start+size`` each row may see: its [lo, hi) range, hi clamped to the
    batch element's valid REF length when the range is a clamped one."""
    hi = jnp.minimum(hi_ref[...], limit_ref[b]) if clamp else hi_ref[...]
    pos = start + lax.broadcasted_iota(jnp.int32, (1, size), 1)
    return (pos >= lo_ref[...]) & (pos < hi)


def _precision(a):
    """fp32 operands: full-precision products (the MXU default rounds them to bf16)."""
    return lax.Precision.HIGHEST if a.dtype == jnp.float32 else None


def _dot_nt(a, b):
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                           precision=_precision(a))


def _dot_tn(a, b):
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32,
                           precision=_precision(a))


def _dot_nn(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=_precision(a))


# ----------------------------------------------------------------------------- forward

def _forward_kernel(tab_ref, limit_ref, q_ref, *refs, clamped, block_k, scale, n_outer,
                    n_steps):
    n = len(clamped)
    sources = [refs[4 * s:4 * s + 4] for s in range(n)]          # k, v, lo, hi
    o_ref, lse_ref, m_sc, l_sc, acc_sc = refs[4 * n:]
    b, i, step = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    base = (b * n_outer + i) * 4

    @pl.when(step == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, _NEG, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    for phase, ((k_ref, v_ref, lo_ref, hi_ref), clamp, bk) in enumerate(
            zip(sources, clamped, block_k)):
        active, local = _phase_active(tab_ref, base, phase, step)

        @pl.when(active)
        def _visit(k_ref=k_ref, v_ref=v_ref, lo_ref=lo_ref, hi_ref=hi_ref, clamp=clamp, bk=bk,
                   local=local, phase=phase):
            start = (tab_ref[base + 2 * phase] + local) * bk
            mask = _mask(start, bk, lo_ref, hi_ref, limit_ref, b, clamp)
            s = jnp.where(mask, _dot_nt(q_ref[...], k_ref[...]) * scale, _NEG)
            m_prev = m_sc[...]
            m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            correction = jnp.exp(m_prev - m_next)
            p = jnp.where(mask, jnp.exp(s - m_next), 0.0)
            l_sc[...] = l_sc[...] * correction + jnp.sum(p, axis=1, keepdims=True)
            acc_sc[...] = acc_sc[...] * correction + _dot_nn(p.astype(v_ref.dtype), v_ref[...])
            m_sc[...] = m_next

    @pl.when(step == n_steps - 1)
    def _finish():
        denom = l_sc[...]
        seen = denom > 0.0
        l_safe = jnp.where(seen, denom, 1.0)
        o_ref[...] = (acc_sc[...] / l_safe).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, m_sc[...] + jnp.log(l_safe), _NEG)


def _query_phases(st, query, bq, backward):
    """Forward/dQ phases of a query segment: one per key source, with its tables."""
    phases, specs_src = [], []
    for source in sources_of(st.layout, query):
        bk = st.block(source, "k", backward=backward)
        tab = source_tables(st.layout, query, source, bq, bk)
        first, last = tab.blocks[:, 0], tab.blocks[:, 1]
        cut = _ref_cut(first, last, bk) if tab.clamped else None
        phases.append((first, np.maximum(last - first, 0), cut))
        specs_src.append((source, bk, tab))
    return phases, specs_src


def forward_segment(st, query, q, kv, limit):
    batch, n_q, heads, dim = q.shape
    bq = st.block(query, "q", backward=False)
    phases, srcs = _query_phases(st, query, bq, backward=False)
    table, n_steps = _phase_tables(phases, batch, limit)
    qp = _to_bhsd(q, bq)
    n_outer = qp.shape[2] // bq
    inputs = [qp]
    specs = [pl.BlockSpec((None, None, bq, dim), lambda b, h, i, s, *_: (b, h, i, 0))]
    for phase, (source, bk, tab) in enumerate(srcs):
        k, v = (_to_bhsd(x, bk) for x in kv[source])

        def kv_map(b, h, i, s, tables, _limit, phase=phase):
            return b, h, _phase_index(tables, (b * n_outer + i) * 4, phase, s), 0

        kv_spec = pl.BlockSpec((None, None, bk, dim), kv_map)
        row_spec = pl.BlockSpec((bq, 1), lambda b, h, i, s, *_: (i, 0))
        inputs += [k, v, *_rows(tab.rows)]
        specs += [kv_spec, kv_spec, row_spec, row_spec]
    out_shape = [jax.ShapeDtypeStruct(qp.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, qp.shape[2], 1), jnp.float32)]
    out_specs = [pl.BlockSpec((None, None, bq, dim), lambda b, h, i, s, *_: (b, h, i, 0)),
                 pl.BlockSpec((None, None, bq, 1), lambda b, h, i, s, *_: (b, h, i, 0))]
    kernel = functools.partial(
        _forward_kernel, clamped=tuple(t.clamped for _, _, t in srcs),
        block_k=tuple(bk for _, bk, _ in srcs), scale=st.scale, n_outer=n_outer,
        n_steps=n_steps)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(batch, heads, n_outer, n_steps), in_specs=specs,
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, dim), jnp.float32)])
    o, lse = pl.pallas_call(kernel, grid_spec=grid_spec, out_shape=out_shape,
                            compiler_params=_params(st), interpret=_interpret(st),
                            name=f"sra_tpu_forward_{query}")(table, limit, *inputs)
    return jnp.swapaxes(o[:, :, :n_q], 1, 2), lse[:, :, :n_q, 0]


# ----------------------------------------------------------------------------- backward

def _dq_kernel(tab_ref, limit_ref, q_ref, do_ref, lse_ref, delta_ref, *refs, clamped, block_k,
               scale, n_outer, n_steps):
    n = len(clamped)
    sources = [refs[4 * s:4 * s + 4] for s in range(n)]
    dq_ref, dq_sc = refs[4 * n:]
    b, i, step = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    base = (b * n_outer + i) * 4

    @pl.when(step == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    for phase, ((k_ref, v_ref, lo_ref, hi_ref), clamp, bk) in enumerate(
            zip(sources, clamped, block_k)):
        active, local = _phase_active(tab_ref, base, phase, step)

        @pl.when(active)
        def _visit(k_ref=k_ref, v_ref=v_ref, lo_ref=lo_ref, hi_ref=hi_ref, clamp=clamp, bk=bk,
                   local=local, phase=phase):
            start = (tab_ref[base + 2 * phase] + local) * bk
            mask = _mask(start, bk, lo_ref, hi_ref, limit_ref, b, clamp)
            k = k_ref[...]
            p = jnp.where(mask, jnp.exp(_dot_nt(q_ref[...], k) * scale - lse_ref[...]), 0.0)
            ds = p * (_dot_nt(do_ref[...], v_ref[...]) - delta_ref[...])
            dq_sc[...] = dq_sc[...] + _dot_nn(ds.astype(k.dtype), k)

    @pl.when(step == n_steps - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def dq_segment(st, query, q, do, lse, delta, kv, limit):
    batch, n_q, heads, dim = q.shape
    bq = st.block(query, "q", backward=True)
    phases, srcs = _query_phases(st, query, bq, backward=True)
    table, n_steps = _phase_tables(phases, batch, limit)
    qp, dop = _to_bhsd(q, bq), _to_bhsd(do, bq)
    n_outer = qp.shape[2] // bq
    row = pl.BlockSpec((None, None, bq, dim), lambda b, h, i, s, *_: (b, h, i, 0))
    col = pl.BlockSpec((None, None, bq, 1), lambda b, h, i, s, *_: (b, h, i, 0))
    inputs = [qp, dop, _column(lse, bq), _column(delta, bq)]
    specs = [row, row, col, col]
    for phase, (source, bk, tab) in enumerate(srcs):
        k, v = (_to_bhsd(x, bk) for x in kv[source])

        def kv_map(b, h, i, s, tables, _limit, phase=phase):
            return b, h, _phase_index(tables, (b * n_outer + i) * 4, phase, s), 0

        kv_spec = pl.BlockSpec((None, None, bk, dim), kv_map)
        row_spec = pl.BlockSpec((bq, 1), lambda b, h, i, s, *_: (i, 0))
        inputs += [k, v, *_rows(tab.rows)]
        specs += [kv_spec, kv_spec, row_spec, row_spec]
    kernel = functools.partial(
        _dq_kernel, clamped=tuple(t.clamped for _, _, t in srcs),
        block_k=tuple(bk for _, bk, _ in srcs), scale=st.scale, n_outer=n_outer,
        n_steps=n_steps)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(batch, heads, n_outer, n_steps), in_specs=specs,
        out_specs=row, scratch_shapes=[pltpu.VMEM((bq, dim), jnp.float32)])
    dq = pl.pallas_call(kernel, grid_spec=grid_spec,
                        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
                        compiler_params=_params(st), interpret=_interpret(st),
                        name=f"sra_tpu_dq_{query}")(table, limit, *inputs)
    return jnp.swapaxes(dq[:, :, :n_q], 1, 2)


def _dkv_kernel(tab_ref, limit_ref, k_ref, v_ref, *refs, clamped, block_q, block_k, scale,
                n_outer, n_steps):
    n = len(clamped)
    queries = [refs[6 * c:6 * c + 6] for c in range(n)]          # q, do, lse, delta, lo, hi
    dk_ref, dv_ref, dk_sc, dv_sc = refs[6 * n:]
    b, j, step = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    base = (b * n_outer + j) * 4
    key_start = j * block_k

    @pl.when(step == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    for phase, ((q_ref, do_ref, lse_ref, delta_ref, lo_ref, hi_ref), clamp) in enumerate(
            zip(queries, clamped)):
        active, _ = _phase_active(tab_ref, base, phase, step)

        @pl.when(active)
        def _visit(q_ref=q_ref, do_ref=do_ref, lse_ref=lse_ref, delta_ref=delta_ref,
                   lo_ref=lo_ref, hi_ref=hi_ref, clamp=clamp):
            mask = _mask(key_start, block_k, lo_ref, hi_ref, limit_ref, b, clamp)
            q, do = q_ref[...], do_ref[...]
            p = jnp.where(mask, jnp.exp(_dot_nt(q, k_ref[...]) * scale - lse_ref[...]), 0.0)
            dv_sc[...] = dv_sc[...] + _dot_tn(p.astype(do.dtype), do)
            ds = p * (_dot_nt(do, v_ref[...]) - delta_ref[...])
            dk_sc[...] = dk_sc[...] + _dot_tn(ds.astype(q.dtype), q)

    @pl.when(step == n_steps - 1)
    def _finish():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def dkv_segment(st, source, k, v, per_query, limit):
    batch, n_k, heads, dim = k.shape
    bk = st.block(source, "k", backward=True)
    kp, vp = _to_bhsd(k, bk), _to_bhsd(v, bk)
    n_outer = kp.shape[2] // bk
    phases, queries = [], []
    for query, (q, do, lse, delta) in per_query.items():
        bq = st.block(query, "q", backward=True)
        tab = source_tables(st.layout, query, source, bq, bk)
        first, last = tab.transposed[:, 0], tab.transposed[:, 1]
        count = np.maximum(last - first, 0)
        phases.append((first, count, _key_cut(count, bk) if tab.clamped else None))
        queries.append((bq, tab, q, do, lse, delta))
    table, n_steps = _phase_tables(phases, batch, limit)
    key = pl.BlockSpec((None, None, bk, dim), lambda b, h, j, s, *_: (b, h, j, 0))
    inputs, specs = [kp, vp], [key, key]
    for phase, (bq, tab, q, do, lse, delta) in enumerate(queries):
        def q_map(b, h, j, s, tables, _limit, phase=phase):
            return b, h, _phase_index(tables, (b * n_outer + j) * 4, phase, s), 0

        def rows_map(b, h, j, s, tables, _limit, phase=phase):
            return _phase_index(tables, (b * n_outer + j) * 4, phase, s), 0

        row = pl.BlockSpec((None, None, bq, dim), q_map)
        col = pl.BlockSpec((None, None, bq, 1), q_map)
        rng = pl.BlockSpec((bq, 1), rows_map)
        inputs += [_to_bhsd(q, bq), _to_bhsd(do, bq), _column(lse, bq), _column(delta, bq),
                   *_rows(tab.rows)]
        specs += [row, row, col, col, rng, rng]
    kernel = functools.partial(
        _dkv_kernel, clamped=tuple(t.clamped for _, t, *_ in queries),
        block_q=tuple(bq for bq, *_ in queries), block_k=bk, scale=st.scale, n_outer=n_outer,
        n_steps=n_steps)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(batch, heads, n_outer, n_steps), in_specs=specs,
        out_specs=[key, key], scratch_shapes=[pltpu.VMEM((bk, dim), jnp.float32),
                                              pltpu.VMEM((bk, dim), jnp.float32)])
    dk, dv = pl.pallas_call(
        kernel, grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(kp.shape, k.dtype),
                   jax.ShapeDtypeStruct(vp.shape, v.dtype)],
        compiler_params=_params(st), interpret=_interpret(st),
        name=f"sra_tpu_dkv_{source}")(table, limit, *inputs)
    return jnp.swapaxes(dk[:, :, :n_k], 1, 2), jnp.swapaxes(dv[:, :, :n_k], 1, 2)
