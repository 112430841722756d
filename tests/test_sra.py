"""Sparse Reference Attention: the rule, its count, and what each side may see."""

import dataclasses

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from avatarv_jax.kernels.sra_layout import SRALayout
from avatarv_jax.layers.attention import sparse_reference_attention
from avatarv_jax.models.dit import DiT
from avatarv_jax.testing import perturb_zero_init, random_inputs, tiny_dit_config


def brute_force_mask(layout: SRALayout) -> np.ndarray:
    """The rule of DESIGN §3.1 evaluated pair by pair."""
    t, n_ref = layout.tokens_per_frame, layout.ref_len
    n = n_ref + layout.gen_len
    mask = np.zeros((n, n), bool)
    for q in range(n):
        for k in range(n):
            q_is_ref, k_is_ref = q < n_ref, k < n_ref
            qf = q // t if q_is_ref else (q - n_ref) // t
            kf = k // t if k_is_ref else (k - n_ref) // t
            if q_is_ref:
                w = layout.ref_window
                mask[q, k] = k_is_ref and (w == -1 or abs(qf - kf) <= w)
            else:
                w = layout.gen_window
                mask[q, k] = k_is_ref or w == -1 or abs(qf - kf) <= w
    return mask


@pytest.mark.parametrize("ref_frames,gen_frames,t,ref_window,gen_window", [
    (3, 2, 2, 0, -1), (4, 3, 3, 1, -1), (5, 4, 2, 3, 1), (2, 3, 1, -1, 0), (0, 3, 2, 0, -1),
])
def test_mask_matches_rule_and_count(ref_frames, gen_frames, t, ref_window, gen_window):
    layout = SRALayout(ref_frames, gen_frames, t, ref_window, gen_window)
    mask = layout.dense_mask()
    np.testing.assert_array_equal(mask, brute_force_mask(layout))
    assert layout.allowed_pairs() == mask.sum()
    # At most two contiguous ranges per query: one in REF, one in GEN.
    for row in mask:
        for part in (row[:layout.ref_len], row[layout.ref_len:]):
            idx = np.flatnonzero(part)
            assert idx.size == 0 or idx[-1] - idx[0] + 1 == idx.size


def test_allowed_pairs_linear_in_reference_length():
    gen_frames, t, w = 4, 6, 1
    n_gen = gen_frames * t
    pairs = [SRALayout(n * gen_frames, gen_frames, t, ref_window=w).allowed_pairs()
             for n in range(1, 17)]
    # Closed form: GEN rows n_gen * (n_ref + n_gen); REF rows t^2 * sum of window sizes,
    # (2w + 1) per frame minus the w(w+1) lost at the two edges.
    for n, p in zip(range(1, 17), pairs):
        n_ref_frames = n * gen_frames
        ref_rows = t * t * ((2 * w + 1) * n_ref_frames - w * (w + 1))
        assert p == n_gen * (n_ref_frames * t + n_gen) + ref_rows
    assert np.all(np.diff(pairs, n=2) == 0)          # exactly affine in the reference length
    quadratic = [SRALayout(n * gen_frames, gen_frames, t, ref_window=-1).allowed_pairs()
                 for n in range(1, 17)]
    assert np.all(np.diff(quadratic, n=2) > 0)       # the `all` ablation is quadratic


def _qkv(key, batch, length, heads=2, dim=8):
    return [jax.random.normal(k, (batch, length, heads, dim)) for k in jax.random.split(key, 3)]


def test_attention_ref_blind_to_gen_and_windowed():
    layout = SRALayout(ref_frames=5, gen_frames=3, tokens_per_frame=2, ref_window=1)
    ref = _qkv(jax.random.key(0), 1, layout.ref_len)
    gen = _qkv(jax.random.key(1), 1, layout.gen_len)
    o_ref, o_gen = sparse_reference_attention(*ref, *gen, layout=layout)

    gen2 = [x + 1.0 for x in gen]
    o_ref2, o_gen2 = sparse_reference_attention(*ref, *gen2, layout=layout)
    np.testing.assert_array_equal(np.asarray(o_ref), np.asarray(o_ref2))   # bit-identical
    assert not np.allclose(o_gen, o_gen2)

    t = layout.tokens_per_frame
    for j in range(layout.ref_frames):
        changed = [x.at[:, j * t:(j + 1) * t].add(1.0) for x in ref]
        o_ref3, o_gen3 = sparse_reference_attention(*changed, *gen, layout=layout)
        diff = np.abs(np.asarray(o_ref3 - o_ref)).reshape(layout.ref_frames, -1).max(axis=1)
        for i in range(layout.ref_frames):
            assert (diff[i] > 0) == (abs(i - j) <= layout.ref_window), (i, j)
        assert not np.allclose(o_gen3, o_gen)          # GEN sees every REF frame


def test_ref_valid_frames_hide_reference_from_gen():
    layout = SRALayout(ref_frames=3, gen_frames=2, tokens_per_frame=2)
    ref = _qkv(jax.random.key(0), 2, layout.ref_len)
    gen = _qkv(jax.random.key(1), 2, layout.gen_len)
    valid = jnp.array([3, 1])
    _, o_gen = sparse_reference_attention(*ref, *gen, layout=layout, ref_valid_frames=valid)
    changed = [x.at[:, 2:].add(5.0) for x in ref]    # frames 1 and 2 change
    _, o_gen2 = sparse_reference_attention(*changed, *gen, layout=layout, ref_valid_frames=valid)
    assert not np.allclose(o_gen[0], o_gen2[0])
    np.testing.assert_array_equal(np.asarray(o_gen[1]), np.asarray(o_gen2[1]))
    # No reference at all equals attention over GEN alone.
    none = jnp.zeros(2, jnp.int32)
    _, o_none = sparse_reference_attention(*ref, *gen, layout=layout, ref_valid_frames=none)
    empty = [x[:, :0] for x in ref]
    _, o_alone = sparse_reference_attention(
        *empty, *gen, layout=dataclasses.replace(layout, ref_frames=0))
    np.testing.assert_allclose(o_none, o_alone, atol=1e-6)


def test_bad_shapes_are_named():
    layout = SRALayout(ref_frames=2, gen_frames=2, tokens_per_frame=2)
    ref = _qkv(jax.random.key(0), 1, 3)
    gen = _qkv(jax.random.key(1), 1, layout.gen_len)
    with pytest.raises(ValueError, match="q_ref has shape"):
        sparse_reference_attention(*ref, *gen, layout=layout)
    with pytest.raises(ValueError, match="not available"):
        sparse_reference_attention(*ref, *gen, layout=layout, impl="nope")


@pytest.fixture(scope="module")
def model_and_inputs():
    cfg = tiny_dit_config(num_layers=2)
    model = perturb_zero_init(DiT(cfg, rngs=nnx.Rngs(0)))
    gen, ref = random_inputs(cfg, batch=1, gen_frames=2, ref_frames=4, size=(4, 4))
    fwd = jax.jit(lambda g, r: model(g, r, return_ref_hidden=True))
    return model, fwd, gen, ref


def test_dit_ref_stream_never_sees_gen(model_and_inputs):
    _, fwd, gen, ref = model_and_inputs
    base = fwd(gen, ref)
    changed = gen.replace(latents=gen.latents + 1.0, text=gen.text * 2, audio=gen.audio + 1,
                          motion=gen.motion - 1, timesteps=gen.timesteps * 0.5)
    out = fwd(changed, ref)
    np.testing.assert_array_equal(np.asarray(base["ref_hidden"]), np.asarray(out["ref_hidden"]))
    assert not np.allclose(base["video"], out["video"])


def test_dit_ref_frames_isolated_and_gen_sees_all(model_and_inputs):
    _, fwd, gen, ref = model_and_inputs                 # ref_window = 0 at every layer
    base = fwd(gen, ref)
    for j in range(ref.latents.shape[1]):
        out = fwd(gen, ref.replace(latents=ref.latents.at[:, j].add(1.0)))
        diff = np.abs(np.asarray(out["ref_hidden"] - base["ref_hidden"])).max(axis=(0, 2, 3))
        assert diff[j] > 0 and np.all(np.delete(diff, j) == 0), (j, diff)
        assert np.abs(np.asarray(out["video"] - base["video"])).max() > 1e-6
