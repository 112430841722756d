"""Block tables of Sparse Reference Attention: which key blocks each query block visits.

A block-sparse SRA kernel tiles every segment on its own: REF queries, GEN queries, REF keys
and GEN keys are each padded to whole blocks, so a ``RefCache`` is read in place and no
``[REF | GEN]`` concatenation is ever built. Key positions here are *segment-local* (GEN key 0
is the first GEN token).

For one query segment and one key segment (a "source") the tables hold:

- ``rows``: per query row, the token range ``[lo, hi)`` of that source it may see; the
  kernel masks partial blocks with it, token-exactly (rows of one block may be in different
  frames). Padding rows get the empty range ``[0, 0)``.
- ``blocks``: per query block, the key blocks ``[first, last)`` covering the union of its rows'
  ranges. Ranges grow monotonically with the row, so the union is one contiguous run.
- ``transposed``: per key block, the query blocks ``[first, last)`` that visit it (what the
  dK/dV pass loops over); contiguous for the same reason.
- ``interior`` / ``transposed_interior``: the part of those runs where the key block lies
  wholly inside the range of every real row of the query block, so the kernels skip the mask
  there (only the blocks at the edges of a range are masked). Also contiguous, also static.

``ref_valid_frames`` (a traced [B] int) only ever shortens the REF range of GEN rows to
``[0, valid * T)``; kernels apply that clamp at run time (:func:`clamp_ref_blocks`), so the
tables stay static numpy arrays.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from avatarv_jax.kernels.sra_layout import SRALayout

REF, GEN = "ref", "gen"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class SourceTables:
    """Tables of one (query segment, key source) pair; see the module docstring."""
    query: str              # "ref" or "gen": the query segment
    source: str             # "ref" or "gen": the key segment
    rows: np.ndarray        # [q_rows_padded, 2] int32 token range per query row
    blocks: np.ndarray      # [num_q_blocks, 2] int32 key-block range per query block
    transposed: np.ndarray  # [num_k_blocks, 2] int32 query-block range per key block
    interior: np.ndarray    # [num_q_blocks, 2] the unmasked sub-run of ``blocks``
    transposed_interior: np.ndarray  # [num_k_blocks, 2] the unmasked sub-run of ``transposed``

    @property
    def clamped(self) -> bool:
        """GEN rows' REF range, which ``ref_valid_frames`` shortens at run time."""
        return self.query == GEN and self.source == REF


def segment_len(layout: SRALayout, segment: str) -> int:
    return layout.ref_len if segment == REF else layout.gen_len


def sources_of(layout: SRALayout, query: str) -> tuple[str, ...]:
    """Key segments a query segment may see (REF queries never see GEN)."""
    if query == REF:
        return (REF,)
    return (REF, GEN) if layout.ref_len else (GEN,)


def row_ranges(layout: SRALayout, query: str, source: str) -> np.ndarray:
    """[segment rows, 2] segment-local key range of ``source`` for every ``query`` row."""
    ranges = layout.key_ranges()
    rows = ranges[:layout.ref_len] if query == REF else ranges[layout.ref_len:]
    if source == REF:
        return rows[:, 0:2].astype(np.int32)
    return (rows[:, 2:4] - layout.ref_len).astype(np.int32)


@functools.lru_cache(maxsize=256)
def source_tables(layout: SRALayout, query: str, source: str, block_q: int,
                  block_k: int) -> SourceTables:
    """Row ranges, block table and transposed block table for one (query, source) pair."""
    n_q, n_k = segment_len(layout, query), segment_len(layout, source)
    num_qb, num_kb = cdiv(n_q, block_q), cdiv(n_k, block_k)
    rows = np.zeros((num_qb * block_q, 2), np.int32)
    rows[:n_q] = row_ranges(layout, query, source)
    blocks = np.zeros((num_qb, 2), np.int32)
    for i in range(num_qb):
        r = rows[i * block_q:(i + 1) * block_q]
        r = r[r[:, 1] > r[:, 0]]
        if len(r):
            blocks[i] = (r[:, 0].min() // block_k, cdiv(int(r[:, 1].max()), block_k))
    interior = np.zeros((num_qb, 2), np.int32)
    for i in range(num_qb):
        real = rows[i * block_q:min((i + 1) * block_q, n_q)]   # padding rows are don't-care
        first, last = blocks[i]
        a = min(max(cdiv(int(real[:, 0].max()), block_k), first), last)
        interior[i] = (a, min(max(int(real[:, 1].min()) // block_k, a), last))
    transposed = _transpose(blocks, num_kb, "seeing")
    transposed_interior = _transpose(interior, num_kb, "seeing unmasked")
    for j in range(num_kb):    # an empty interior run sits at the start of the visiting run
        if transposed_interior[j, 0] == transposed_interior[j, 1]:
            transposed_interior[j] = transposed[j, 0]
    for arr in (rows, blocks, transposed, interior, transposed_interior):
        arr.setflags(write=False)
    return SourceTables(query, source, rows, blocks, transposed, interior, transposed_interior)


def _transpose(blocks: np.ndarray, num_kb: int, what: str) -> np.ndarray:
    """Per key block j, the contiguous run of query blocks i with blocks[i, 0] <= j < blocks[i, 1]."""
    transposed = np.zeros((num_kb, 2), np.int32)
    for j in range(num_kb):
        seen_by = np.flatnonzero((blocks[:, 0] <= j) & (j < blocks[:, 1]))
        if len(seen_by):
            if seen_by[-1] - seen_by[0] + 1 != len(seen_by):
                raise AssertionError(f"query blocks {what} key block {j} are not contiguous")
            transposed[j] = (seen_by[0], seen_by[-1] + 1)
    return transposed


def clamp_ref_blocks(blocks: np.ndarray, ref_limit, block_k: int):
    """Key-block ranges of GEN rows over REF once REF is cut to ``ref_limit`` tokens.

    Works on numpy and traced values alike: ``last = min(last, ceil(limit / block_k))``.
    """
    return blocks[..., 0], np.minimum(blocks[..., 1], -(-ref_limit // block_k))


def visited_key_blocks(layout: SRALayout, block_q: int, block_k: int,
                       ref_valid_frames: int | None = None, *, query_ref: bool = True,
                       query_gen: bool = True) -> int:
    """Key blocks the forward kernel visits, per (batch element, head), from the tables."""
    total = 0
    limit = layout.ref_len if ref_valid_frames is None else min(
        ref_valid_frames * layout.tokens_per_frame, layout.ref_len)
    queries = [q for q, on in ((REF, query_ref and layout.ref_len),
                               (GEN, query_gen and layout.gen_len)) if on]
    for query in queries:
        for source in sources_of(layout, query):
            tab = source_tables(layout, query, source, block_q, block_k)
            first, last = tab.blocks[:, 0], tab.blocks[:, 1]
            if tab.clamped:
                first, last = clamp_ref_blocks(tab.blocks, limit, block_k)
            total += int(np.maximum(last - first, 0).sum())
    return total
