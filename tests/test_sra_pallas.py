"""The block-sparse Pallas SRA kernel against the dense-mask reference (interpret mode on CPU)."""

import dataclasses
import json

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from avatarv_jax.kernels.sra_blocks import cdiv, source_tables, visited_key_blocks
from avatarv_jax.kernels.sra_layout import SRALayout
from avatarv_jax.kernels.sra_pallas import BlockSizes, sra_pallas, visit_counts
from avatarv_jax.kernels.sra_reference import sra_reference
from avatarv_jax.layers.attention import get_attention_impl, sparse_reference_attention
from avatarv_jax.testing import (attention_impl_errors, load_benchmark, tiny_dit_config)
from avatarv_jax.tools.bench_io import device_name

SMALL = BlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)


def _inputs(layout, batch, heads, dim, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 6)
    lens = [layout.ref_len] * 3 + [layout.gen_len] * 3
    return [jax.random.normal(k, (batch, n, heads, dim)).astype(dtype)
            for k, n in zip(keys, lens)]


def _loss_and_outputs(impl, layout, valid, **kw):
    """A scalar that mixes outputs and LSEs non-linearly, plus the outputs themselves."""
    def fn(q_ref, k_ref, v_ref, q_gen, k_gen, v_gen):
        (o_ref, o_gen), (l_ref, l_gen) = impl(q_ref, k_ref, v_ref, q_gen, k_gen, v_gen,
                                              layout=layout, ref_valid_frames=valid,
                                              return_lse=True, **kw)
        outs = [x for x in (o_ref, o_gen, l_ref, l_gen) if x is not None]
        f32 = [x.astype(jnp.float32) for x in outs]
        w = [jnp.cos(jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape)) for x in f32]
        loss = sum(jnp.sum(a * b) for a, b in zip(f32, w)) + sum(jnp.sum(x ** 2) for x in f32)
        return loss, (o_ref, o_gen, l_ref, l_gen)
    return fn


def _run(impl, layout, args, valid, argnums, **kw):
    fn = _loss_and_outputs(impl, layout, valid, **kw)
    return jax.jit(jax.value_and_grad(fn, argnums=argnums, has_aux=True))(*args)


def _assert_close(got, want, *, atol=None, rel=None, what=""):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = np.abs(got - want).max() if got.size else 0.0
    if atol is not None:
        assert err <= atol, f"{what}: max abs error {err} > {atol}"
    else:
        scale = max(np.abs(want).max(), 1e-6)
        assert err / scale <= rel, f"{what}: relative error {err / scale} > {rel}"


def _compare(layout, args, valid, *, atol=None, rel=None, argnums=(0, 1, 2, 3, 4, 5),
             block_sizes=SMALL, **kw):
    ref_args = [None if a is None else a.astype(jnp.float32) for a in args]
    (_, want), want_g = _run(sra_reference, layout, ref_args, valid, argnums)
    (_, got), got_g = _run(sra_pallas, layout, args, valid, argnums, block_sizes=block_sizes,
                           **kw)
    for name, g, w in zip(("o_ref", "o_gen", "lse_ref", "lse_gen"), got, want):
        assert (g is None) == (w is None), name
        if g is not None:
            assert g.dtype == (jnp.float32 if name.startswith("lse") else args[1].dtype)
            _assert_close(g, w, atol=atol, rel=rel, what=name)
    names = ("dq_ref", "dk_ref", "dv_ref", "dq_gen", "dk_gen", "dv_gen")
    for i, g, w in zip(argnums, got_g, want_g):
        _assert_close(g, w, atol=atol, rel=rel, what=names[i])


# (ref_frames, gen_frames, tokens_per_frame, ref_window, gen_window, head_dim, valid_frames)
# Segment lengths are not multiples of the 16-token blocks; windows 0, 1, 3 and all.
GRID = [
    (5, 3, 5, 0, -1, 64, None),
    (7, 4, 3, 1, 1, 64, (7, 3)),
    (6, 5, 5, 3, 0, 64, (0, 4)),
    (4, 3, 7, -1, 3, 64, (2, 4)),
    (3, 2, 8, 1, -1, 128, (1, 3)),
]


@pytest.mark.parametrize("ref_frames,gen_frames,t,ref_window,gen_window,dim,valid", GRID)
def test_fp32_outputs_lse_and_grads_match_reference(ref_frames, gen_frames, t, ref_window,
                                                    gen_window, dim, valid):
    layout = SRALayout(ref_frames, gen_frames, t, ref_window, gen_window)
    args = _inputs(layout, batch=2, heads=2, dim=dim)
    valid = None if valid is None else jnp.array(valid)
    _compare(layout, args, valid, atol=1e-5)


@pytest.mark.parametrize("dim", [64, 128])
def test_bf16_matches_reference(dim):
    layout = SRALayout(5, 3, 6, ref_window=1, gen_window=-1)
    args = _inputs(layout, batch=1, heads=2, dim=dim, dtype=jnp.bfloat16, seed=1)
    _compare(layout, args, jnp.array([4]), rel=2e-2)


def test_cached_gen_rows_and_reference_rows_alone():
    layout = SRALayout(6, 3, 5, ref_window=1, gen_window=1)
    q_ref, k_ref, v_ref, q_gen, k_gen, v_gen = _inputs(layout, batch=2, heads=2, dim=64)
    valid = jnp.array([6, 2])
    # GEN rows over a RefCache's keys/values (q_ref None): grads reach the cached K/V too.
    _compare(layout, [None, k_ref, v_ref, q_gen, k_gen, v_gen], valid, atol=1e-5,
             argnums=(1, 2, 3, 4, 5))
    # Building the cache: REF rows only, with and without a GEN segment in the layout.
    _compare(layout, [q_ref, k_ref, v_ref, None, None, None], None, atol=1e-5,
             argnums=(0, 1, 2))
    _compare(dataclasses.replace(layout, gen_frames=0), [q_ref, k_ref, v_ref, None, None, None],
             None, atol=1e-5, argnums=(0, 1, 2))


def test_no_reference_segment():
    layout = SRALayout(0, 4, 5, gen_window=1)
    q_ref, k_ref, v_ref, q_gen, k_gen, v_gen = _inputs(layout, batch=1, heads=2, dim=64)
    _compare(layout, [q_ref, k_ref, v_ref, q_gen, k_gen, v_gen], None, atol=1e-5)


def test_default_blocks_and_dispatcher():
    """The registered implementation (default tiles, chosen by name) equals the reference."""
    assert get_attention_impl("pallas") is sra_pallas
    layout = SRALayout(3, 2, 5, ref_window=0)
    args = _inputs(layout, batch=1, heads=2, dim=16)
    got = jax.jit(lambda *a: sparse_reference_attention(*a, layout=layout, impl="pallas"))(*args)
    want = sra_reference(*args, layout=layout)
    for g, w in zip(got, want):
        _assert_close(g, w, atol=1e-5)


def test_valid_frames_are_data_not_shapes():
    """Changing ref_valid_frames reuses the compiled kernel and still matches the reference."""
    layout = SRALayout(4, 2, 5, ref_window=0)
    args = _inputs(layout, batch=2, heads=1, dim=16)
    fn = jax.jit(lambda valid: sra_pallas(*args, layout=layout, ref_valid_frames=valid,
                                          block_sizes=SMALL)[1])
    for valid in ([4, 1], [0, 3]):
        want = sra_reference(*args, layout=layout, ref_valid_frames=jnp.array(valid))[1]
        _assert_close(fn(jnp.array(valid)), want, atol=1e-5, what=str(valid))
    assert fn._cache_size() == 1


def test_bad_input_is_named():
    layout = SRALayout(2, 2, 3)
    q_ref, k_ref, v_ref, q_gen, k_gen, v_gen = _inputs(layout, batch=1, heads=2, dim=16)
    with pytest.raises(ValueError, match="q_gen has shape"):
        sra_pallas(q_ref, k_ref, v_ref, q_gen[:, :2], k_gen, v_gen, layout=layout)
    with pytest.raises(ValueError, match="v_gen has head dim 8"):
        sra_pallas(q_ref, k_ref, v_ref, q_gen, k_gen, v_gen[..., :8], layout=layout)
    with pytest.raises(ValueError, match="needs REF or GEN queries"):
        sra_pallas(None, k_ref, v_ref, None, None, None, layout=layout)
    with pytest.raises(ValueError, match="block_k must be a power of two"):
        BlockSizes(block_k=48)


# ------------------------------------------------------------------ blocks visited

def _expected_visits(layout, bq, bk, valid):
    """Key blocks per (batch, head), from frame arithmetic alone (independent of the tables)."""
    t, total = layout.tokens_per_frame, 0

    def window(f0, f1, w, n):
        return (0, n) if w == -1 else (max(f0 - w, 0), min(f1 + w + 1, n))

    for i in range(cdiv(layout.ref_len, bq)):                  # REF query blocks
        f0, f1 = i * bq // t, (min((i + 1) * bq, layout.ref_len) - 1) // t
        lo, hi = window(f0, f1, layout.ref_window, layout.ref_frames)
        total += cdiv(hi * t, bk) - lo * t // bk
    limit = layout.ref_len if valid is None else min(valid, layout.ref_frames) * t
    for i in range(cdiv(layout.gen_len, bq)):                  # GEN query blocks
        f0, f1 = i * bq // t, (min((i + 1) * bq, layout.gen_len) - 1) // t
        lo, hi = window(f0, f1, layout.gen_window, layout.gen_frames)
        total += cdiv(limit, bk) + cdiv(hi * t, bk) - lo * t // bk
    return total


@pytest.mark.parametrize("layout,valid", [
    (SRALayout(9, 3, 5, ref_window=1, gen_window=-1), (9, 4)),
    (SRALayout(6, 4, 3, ref_window=0, gen_window=1), (0, 6)),
])
def test_kernel_visits_exactly_the_table_blocks(layout, valid):
    blocks = BlockSizes(block_q=8, block_k=8)
    args = _inputs(layout, batch=2, heads=1, dim=16)
    counted = np.asarray(visit_counts(*args, layout=layout, ref_valid_frames=jnp.array(valid),
                                      block_sizes=blocks))
    for b, v in enumerate(valid):
        expected = _expected_visits(layout, 8, 8, v)
        assert visited_key_blocks(layout, 8, 8, v) == expected
        assert counted[b, 0] == expected, (b, counted, expected)
    nr, ng = cdiv(layout.ref_len, 8), cdiv(layout.gen_len, 8)
    assert counted.max() < nr * nr + ng * (nr + ng)          # fewer than a dense kernel


def test_visits_grow_linearly_with_reference_length():
    gen_frames, t, bq, bk = 4, 8, 8, 8                         # one frame = one block
    counts, pairs = [], []
    for n in range(1, 9):
        layout = SRALayout(n * gen_frames, gen_frames, t, ref_window=1)
        counts.append(visited_key_blocks(layout, bq, bk))
        pairs.append(layout.allowed_pairs())
    assert np.all(np.diff(counts, n=2) == 0) and np.all(np.diff(counts) > 0)
    # With frame-aligned blocks every visited block is fully allowed: visits = pairs / tile.
    np.testing.assert_array_equal(np.array(counts) * bq * bk, pairs)
    # The `all` window (the quadratic ablation) is not linear.
    quad = [visited_key_blocks(SRALayout(n * gen_frames, gen_frames, t, ref_window=-1), bq, bk)
            for n in range(1, 9)]
    assert np.all(np.diff(quad, n=2) > 0)


def test_tables_are_contiguous_and_cover_every_allowed_pair():
    layout = SRALayout(7, 5, 3, ref_window=1, gen_window=2)
    mask = layout.dense_mask()
    for query, q0, n_q in (("ref", 0, layout.ref_len), ("gen", layout.ref_len, layout.gen_len)):
        for source, k0 in (("ref", 0), ("gen", layout.ref_len)):
            if query == "ref" and source == "gen":
                continue
            tab = source_tables(layout, query, source, 8, 4)
            n_k = layout.ref_len if source == "ref" else layout.gen_len
            sub = mask[q0:q0 + n_q, k0:k0 + n_k]
            for r in range(n_q):
                allowed = np.flatnonzero(sub[r])
                assert tab.rows[r, 0] == allowed[0] and tab.rows[r, 1] == allowed[-1] + 1
                first, last = tab.blocks[r // 8]
                assert first * 4 <= allowed[0] and allowed[-1] < last * 4
            for j, (first, last) in enumerate(tab.transposed):
                for i in range(len(tab.blocks)):
                    assert (first <= i < last) == (tab.blocks[i, 0] <= j < tab.blocks[i, 1])


@pytest.mark.parametrize("layout,bq,bk", [
    (SRALayout(7, 5, 3, ref_window=1, gen_window=2), 8, 4),
    (SRALayout(5, 3, 24, ref_window=0, gen_window=-1), 16, 16),
    (SRALayout(4, 6, 10, ref_window=-1, gen_window=1), 16, 8),
])
def test_unmasked_interiors_are_exactly_the_wholly_allowed_blocks(layout, bq, bk):
    """A key block runs without the token mask iff every real row of the query block may see
    all of it: the interior runs (and their transposes) are exact, not just safe."""
    mask = layout.dense_mask()
    used = 0
    for query, q0, n_q in (("ref", 0, layout.ref_len), ("gen", layout.ref_len, layout.gen_len)):
        for source, k0 in (("ref", 0), ("gen", layout.ref_len)):
            if query == "ref" and source == "gen":
                continue
            tab = source_tables(layout, query, source, bq, bk)
            n_k = layout.ref_len if source == "ref" else layout.gen_len
            sub = mask[q0:q0 + n_q, k0:k0 + n_k]
            for i, ((first, last), (a, b)) in enumerate(zip(tab.blocks, tab.interior)):
                assert first <= a <= b <= last
                rows = sub[i * bq:(i + 1) * bq]
                whole = [j for j in range(first, last)
                         if (j + 1) * bk <= n_k and rows[:, j * bk:(j + 1) * bk].all()]
                assert list(range(a, b)) == whole, (query, source, i)
                used += b - a
            for j, (a, b) in enumerate(tab.transposed_interior):
                first, last = tab.transposed[j]
                assert first <= a <= b <= max(last, first)
                assert [i for i in range(len(tab.interior))
                        if tab.interior[i, 0] <= j < tab.interior[i, 1]] == list(range(a, b))
    assert used > 0


# ------------------------------------------------------------------ TPU variant, lowering, DiT

def test_tpu_variant_matches_reference_in_tpu_interpret_mode():
    """The Mosaic kernels (scalar-prefetched tables, step grid axis) under TPU interpret mode."""
    layout = SRALayout(4, 3, 5, ref_window=1, gen_window=1)
    args = _inputs(layout, batch=2, heads=1, dim=64)
    _compare(layout, args, jnp.array([4, 2]), atol=1e-5, backend="tpu")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("backend,platform,names", [
    ("gpu", "cuda", ("sra_forward_ref", "sra_forward_gen", "sra_dq_gen", "sra_dkv_ref",
                     "sra_dkv_gen")),
    ("tpu", "tpu", ("sra_tpu_forward_ref", "sra_tpu_forward_gen", "sra_tpu_dq_gen",
                    "sra_tpu_dkv_ref", "sra_tpu_dkv_gen")),
])
def test_forward_and_backward_lower_for_the_accelerator(backend, platform, names, dtype):
    """Forward and backward pass Pallas's Triton (GPU) / Mosaic (TPU) lowering, no device."""
    layout = SRALayout(3, 2, 40, ref_window=1)
    args = [jax.ShapeDtypeStruct((1, n, 2, 128), dtype)
            for n in [layout.ref_len] * 3 + [layout.gen_len] * 3]
    blocks = BlockSizes(64, 64, 64, 64) if backend == "gpu" else BlockSizes(128, 128, 128, 128)

    def loss(*a):
        o_ref, o_gen = sra_pallas(*a, layout=layout, ref_valid_frames=jnp.array([2]),
                                  interpret=False, backend=backend, block_sizes=blocks)
        return jnp.sum(o_ref.astype(jnp.float32)) + jnp.sum(o_gen.astype(jnp.float32))

    text = jax.jit(jax.grad(loss, argnums=tuple(range(6)))).trace(*args).lower(
        lowering_platforms=(platform,)).as_text()
    for name in names:
        assert name in text, name


def test_dit_pallas_equals_xla_outputs_and_grads():
    outputs, worst_grad = attention_impl_errors(tiny_dit_config(num_layers=1, ref_window=1),
                                                "pallas")
    for key, (abs_err, _) in outputs.items():
        assert abs_err <= 2e-5, (key, abs_err)
    assert worst_grad <= 1e-4, worst_grad


def test_benchmark_writes_json_and_rejects_bad_input(tmp_path, capsys):
    bench = load_benchmark("sra_kernel")
    assert bench.main(["--multiples", "1,x"]) == 2
    assert "--multiples must be integers" in capsys.readouterr().err
    assert bench.main(["--blocks", "64,64"]) == 2
    assert "--blocks takes 4, 6 or 8 integers" in capsys.readouterr().err
    out = tmp_path / "sra.json"
    assert bench.main(["--gen_frames", "2", "--tokens_per_frame", "4", "--heads", "1",
                       "--head_dim", "16", "--multiples", "1,2", "--repeats", "1",
                       "--impls", "xla", "--dtype", "float32", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["device"] == device_name() and [r["ref_len"] for r in result["rows"]] == [8, 16]
    assert result["rows"][1]["allowed_pairs"] == SRALayout(4, 2, 4).allowed_pairs()
    assert set(result["linearity"]) == {"xla"}
