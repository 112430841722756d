"""Classifier-free guidance and condition dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avatarv_jax.diffusion.guidance import (
    ConditionDropout, guidance_coefficients, guided_velocity, num_guidance_passes,
    sample_condition_masks)


def _tree(seed):
    rng = np.random.default_rng(seed)
    return {"video": jnp.asarray(rng.standard_normal((2, 3, 4, 4, 2)), jnp.float32),
            "motion": jnp.asarray(rng.standard_normal((2, 3, 5)), jnp.float32)}


def test_guided_velocity_matches_numpy():
    u, t, f = _tree(0), _tree(1), _tree(2)
    out = jax.jit(lambda u, t, f: guided_velocity(u, t, f, text_scale=4.5, audio_scale=2.5))(
        u, t, f)
    for name in ("video", "motion"):
        nu, nt, nf = (np.asarray(x[name], np.float64) for x in (u, t, f))
        expected = nu + 4.5 * (nt - nu) + 2.5 * (nf - nt)
        np.testing.assert_allclose(out[name], expected, rtol=1e-5, atol=1e-5)
        cu, ct, cf = guidance_coefficients(4.5, 2.5)
        np.testing.assert_allclose(out[name], cu * nu + ct * nt + cf * nf, rtol=1e-5, atol=1e-5)


def test_guidance_special_scales():
    u, t, f = _tree(3), _tree(4), _tree(5)
    same = guided_velocity(u, t, f, text_scale=1.0, audio_scale=1.0)
    off_audio = guided_velocity(u, t, f, text_scale=1.0, audio_scale=0.0)
    uncond = guided_velocity(u, t, f, text_scale=0.0, audio_scale=0.0)
    for name in ("video", "motion"):
        np.testing.assert_allclose(same[name], f[name], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(off_audio[name], t[name], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(uncond[name], u[name], rtol=1e-6, atol=1e-6)
    # audio_scale = 0 ignores the audio prediction entirely.
    other_full = jax.tree.map(lambda a: a + 100.0, f)
    a = guided_velocity(u, t, f, text_scale=5.0, audio_scale=0.0)
    b = guided_velocity(u, t, other_full, text_scale=5.0, audio_scale=0.0)
    np.testing.assert_allclose(a["video"], b["video"], rtol=1e-6)
    assert sum(guidance_coefficients(3.0, 7.0)) == pytest.approx(1.0)


def test_per_sample_scales_and_dtype():
    u, t, f = _tree(6), _tree(7), _tree(8)
    ts, aus = jnp.array([1.0, 5.0]), jnp.array([2.0, 0.5])
    out = guided_velocity(u, t, f, text_scale=ts, audio_scale=aus)
    for i in range(2):
        single = guided_velocity(u, t, f, text_scale=float(ts[i]), audio_scale=float(aus[i]))
        np.testing.assert_allclose(out["motion"][i], single["motion"][i], rtol=1e-6)
    half = jax.tree.map(lambda a: a.astype(jnp.bfloat16), u)
    assert guided_velocity(half, t, f, text_scale=2.0, audio_scale=2.0)["video"].dtype == \
        jnp.bfloat16
    with pytest.raises(ValueError, match=r"scalar or \[B\]; got shape \(3,\)"):
        guided_velocity(u, t, f, text_scale=jnp.ones(3), audio_scale=1.0)


def test_num_guidance_passes():
    assert num_guidance_passes(1.0, 1.0) == 1
    assert num_guidance_passes(1, 1) == 1
    assert num_guidance_passes(5.0, 1.0) == 3
    assert num_guidance_passes(1.0, 3.0) == 3
    assert num_guidance_passes(4.5, 2.5) == 3


def test_condition_dropout_rates():
    cfg = ConditionDropout(p_text=0.2, p_audio=0.3, p_ref=0.1, p_all=0.15)
    n = 200_000
    masks = sample_condition_masks(jax.random.key(0), n, cfg)
    assert set(masks) == {"keep_text", "keep_audio", "keep_ref"}
    text, audio, ref = (np.asarray(masks[k]) for k in ("keep_text", "keep_audio", "keep_ref"))
    for m in (text, audio, ref):
        assert m.shape == (n,) and m.dtype == np.bool_
    tol = 0.006   # > 5 standard errors at n = 200k
    assert abs(text.mean() - 0.85 * 0.8) < tol
    assert abs(audio.mean() - 0.85 * 0.7) < tol
    assert abs(ref.mean() - 0.85 * 0.9) < tol
    all_dropped = ~text & ~audio & ~ref
    # Everything dropped: the p_all event, or all three dropped independently by chance.
    assert abs(all_dropped.mean() - (0.15 + 0.85 * 0.2 * 0.3 * 0.1)) < tol
    # Audio dropped alone with text and reference kept: the v_text training case.
    assert abs((text & ~audio & ref).mean() - 0.85 * 0.8 * 0.3 * 0.9) < tol
    # Within the non-p_all samples the conditions drop independently of each other.
    kept_any = text | audio | ref
    joint = (text & audio)[kept_any].mean()
    np.testing.assert_allclose(joint, text[kept_any].mean() * audio[kept_any].mean(), atol=tol)


def test_p_all_drops_everything_together():
    masks = sample_condition_masks(jax.random.key(1), 5_000,
                                   ConditionDropout(p_text=0.0, p_audio=0.0, p_ref=0.0, p_all=0.3))
    text, audio, ref = (np.asarray(masks[k]) for k in ("keep_text", "keep_audio", "keep_ref"))
    np.testing.assert_array_equal(text, audio)
    np.testing.assert_array_equal(text, ref)
    assert abs((~text).mean() - 0.3) < 0.03
    never = sample_condition_masks(jax.random.key(2), 1000, ConditionDropout(0.0, 0.0, 0.0, 0.0))
    assert all(bool(np.all(v)) for v in never.values())


def test_condition_dropout_errors():
    with pytest.raises(ValueError, match=r"ConditionDropout.p_audio must be in \[0, 1\], got 1.5"):
        ConditionDropout(p_audio=1.5)
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        sample_condition_masks(jax.random.key(0), 0, ConditionDropout())
