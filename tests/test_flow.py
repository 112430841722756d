"""Flow-matching pieces: sigma shift and sampling, noising, losses, region weights."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avatarv_jax.diffusion.flow import (
    NUM_TRAIN_TIMESTEPS, flow_loss, motion_loss, noise_latents, prefix_frame_sigma,
    resolution_shift, sample_training_sigma, shift_sigma, sigma_to_timestep, total_loss,
    velocity_target)
from avatarv_jax.diffusion.regions import latent_frames, region_token_weights


# ---------------------------------------------------------------- shift and timestep sampling

def test_shift_sigma_values():
    s = np.array([0.0, 0.25, 0.5, 0.9, 1.0])
    np.testing.assert_allclose(shift_sigma(s, 1.0), s, rtol=1e-6)
    np.testing.assert_allclose(shift_sigma(s, 3.0), 3 * s / (1 + 2 * s), rtol=1e-6)
    np.testing.assert_allclose(shift_sigma(0.5, 5.0), 5 / 6, rtol=1e-6)
    with pytest.raises(ValueError, match="shift must be positive"):
        shift_sigma(s, 0.0)
    assert float(sigma_to_timestep(0.25)) == 0.25 * NUM_TRAIN_TIMESTEPS


def test_resolution_shift():
    np.testing.assert_allclose(resolution_shift(256), math.exp(0.5), rtol=1e-12)
    np.testing.assert_allclose(resolution_shift(4096), math.exp(1.15), rtol=1e-12)
    mid = (256 + 4096) / 2
    np.testing.assert_allclose(resolution_shift(int(mid)), math.exp((0.5 + 1.15) / 2),
                               rtol=1e-12)
    values = [resolution_shift(n) for n in (16, 256, 1024, 1560, 4096, 9000)]
    assert all(a < b for a, b in zip(values, values[1:]))   # larger frames, more noise
    assert isinstance(values[0], float)
    with pytest.raises(ValueError, match="tokens_per_frame must be positive"):
        resolution_shift(0)
    with pytest.raises(ValueError, match="max_tokens"):
        resolution_shift(100, base_tokens=4096, max_tokens=256)


def test_training_sigma_is_logit_normal():
    sigma = sample_training_sigma(jax.random.key(1), (200_000,), logit_mean=0.4, logit_std=0.8)
    assert sigma.shape == (200_000,) and sigma.dtype == jnp.float32
    logit = np.log(sigma) - np.log1p(-np.asarray(sigma))
    assert abs(logit.mean() - 0.4) < 0.01
    assert abs(logit.std() - 0.8) < 0.01
    np.testing.assert_allclose(np.median(sigma), 1 / (1 + math.exp(-0.4)), atol=5e-3)


@pytest.mark.parametrize("shift", [0.5, 3.0, 8.0])
def test_training_sigma_shift_moves_median(shift):
    sigma = sample_training_sigma(jax.random.key(2), (100_000,), shift=shift)
    # The shift is monotone, so the median 1/2 of the logit-normal maps to shift / (1 + shift).
    np.testing.assert_allclose(np.median(sigma), shift / (1 + shift), atol=5e-3)
    eps = 1e-5
    assert float(sigma.min()) >= eps and float(sigma.max()) <= 1 - eps


def test_training_sigma_clipped():
    sigma = sample_training_sigma(jax.random.key(3), (10_000,), logit_std=30.0, eps=1e-3)
    assert float(sigma.min()) == pytest.approx(1e-3) and float(sigma.max()) == pytest.approx(
        1 - 1e-3)


# ---------------------------------------------------------------- noising and target

def _normal(seed, shape):
    # numpy draws: test inputs need no jax RNG (whose first compile per shape is slow).
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _latents(seed, b=2, f=3):
    x0 = {"video": _normal(seed, (b, f, 4, 6, 3)), "motion": _normal(seed + 1, (b, f, 5))}
    noise = {"video": _normal(seed + 2, (b, f, 4, 6, 3)), "motion": _normal(seed + 3, (b, f, 5))}
    return x0, noise


def test_noise_latents_per_frame_sigma():
    x0, noise = _latents(4 * 10)
    sigma = np.array([[0.0, 0.3, 1.0], [0.7, 0.0, 0.5]], np.float32)
    xs = noise_latents(x0, noise, sigma)
    for name in ("video", "motion"):
        a, n, out = (np.asarray(t[name]) for t in (x0, noise, xs))
        for b in range(2):
            for f in range(3):
                s = sigma[b, f]
                np.testing.assert_allclose(out[b, f], (1 - s) * a[b, f] + s * n[b, f],
                                           rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(xs["video"][0, 0], x0["video"][0, 0])   # sigma 0: clean
    np.testing.assert_array_equal(xs["motion"][0, 2], noise["motion"][0, 2])   # sigma 1: noise


def test_noise_latents_batch_sigma_and_dtype():
    x0, noise = _latents(5 * 10)
    xs = noise_latents(x0, noise, jnp.array([0.2, 0.8]))
    np.testing.assert_allclose(xs["motion"][1], 0.2 * x0["motion"][1] + 0.8 * noise["motion"][1],
                               rtol=1e-5, atol=1e-6)
    bf = noise_latents(x0["video"].astype(jnp.bfloat16), noise["video"], jnp.array([0.2, 0.8]))
    assert bf.dtype == jnp.bfloat16


def test_velocity_is_path_derivative():
    x0, noise = _latents(6 * 10)
    v = velocity_target(x0, noise)
    s1, s2 = jnp.array([0.2, 0.6]), jnp.array([0.5, 0.9])
    a, b = noise_latents(x0, noise, s1), noise_latents(x0, noise, s2)
    for name in ("video", "motion"):
        ds = (s2 - s1).reshape((2,) + (1,) * (v[name].ndim - 1))
        np.testing.assert_allclose(b[name] - a[name], ds * v[name], rtol=1e-4, atol=1e-5)


def test_noise_latents_shape_errors():
    x0, noise = _latents(7 * 10)
    with pytest.raises(ValueError, match=r"sigma of shape \(2, 4\) does not match"):
        noise_latents(x0, noise, jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="differs from noise shape"):
        noise_latents(x0["motion"], x0["motion"][:, :2], jnp.zeros(2))


def test_prefix_frame_sigma():
    sigma, mask = prefix_frame_sigma(jnp.array([0.4, 0.9]), 5, 2)
    np.testing.assert_allclose(sigma, [[0, 0, 0.4, 0.4, 0.4], [0, 0, 0.9, 0.9, 0.9]], rtol=1e-6)
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1, 1]] * 2)
    with pytest.raises(ValueError, match="num_prefix < num_frames"):
        prefix_frame_sigma(jnp.array([0.4]), 3, 3)


# ---------------------------------------------------------------- losses

def _numpy_weighted_mse(pred, target, weights_tok, frame_mask):
    """Independent reference: every latent pixel takes the weight of its token by index."""
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    b, f, h, w, c = pred.shape
    wt = np.asarray(weights_tok, np.float64)
    ph, pw = h // wt.shape[2], w // wt.shape[3]
    num = den = 0.0
    for ib in range(b):
        for jf in range(f):
            for y in range(h):
                for x in range(w):
                    wgt = wt[ib, jf, y // ph, x // pw, 0] * frame_mask[ib, jf]
                    num += wgt * np.sum((pred[ib, jf, y, x] - target[ib, jf, y, x]) ** 2)
                    den += wgt * c
    return num / den


def test_flow_loss_matches_numpy_reference():
    pred, target = _normal(80, (2, 3, 4, 6, 3)), _normal(81, (2, 3, 4, 6, 3))
    # One token covers 2 x 2 latent pixels.
    weights = 1 + 3 * np.random.default_rng(82).random((2, 3, 2, 3, 1))
    mask = np.array([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    got = flow_loss(pred, target, token_weights=weights, frame_mask=mask)
    np.testing.assert_allclose(got, _numpy_weighted_mse(pred, target, weights, mask), rtol=1e-5)
    plain = flow_loss(pred, target)
    np.testing.assert_allclose(plain, np.mean((np.asarray(pred) - np.asarray(target)) ** 2),
                               rtol=1e-5)


def test_flow_loss_zero_and_frame_mask_excludes_prefix():
    pred = _normal(90, (2, 4, 2, 2, 3))
    mask = jnp.array([[0.0, 0.0, 1.0, 1.0]] * 2)
    assert float(flow_loss(pred, pred, frame_mask=mask)) == 0.0
    target = jnp.zeros_like(pred)
    base = flow_loss(pred, target, frame_mask=mask)
    changed = pred.at[:, :2].set(100.0)   # only the clean prefix changes
    np.testing.assert_allclose(flow_loss(changed, target, frame_mask=mask), base, rtol=1e-6)
    assert float(flow_loss(changed, target)) > 10 * float(base)   # without the mask it counts
    assert float(flow_loss(pred, target, frame_mask=jnp.zeros((2, 4)))) == 0.0   # no NaN


def test_mouth_error_weighs_more_with_region_weights():
    # 1 x 1 latent frame of 4 x 4 tokens (pixels 64 x 64 at stride 16); mouth at token (2, 1).
    mouth = np.zeros((1, 1, 64, 64), bool)
    mouth[0, 0, 36:40, 20:26] = True
    weights = region_token_weights(None, mouth, None, face_weight=0.0, mouth_weight=4.0,
                                   eye_weight=0.0)
    assert weights.shape == (1, 1, 4, 4, 1)
    target = jnp.zeros((1, 1, 4, 4, 2))
    inside = target.at[0, 0, 2, 1].set(1.0)
    outside = target.at[0, 0, 0, 3].set(1.0)
    w_in = flow_loss(inside, target, token_weights=weights)
    w_out = flow_loss(outside, target, token_weights=weights)
    u_in, u_out = flow_loss(inside, target), flow_loss(outside, target)
    total_weight = (15 * 1 + 5) * 2   # 15 plain tokens and one mouth token, 2 channels each
    np.testing.assert_allclose(w_in, 2 * 5 / total_weight, rtol=1e-6)
    np.testing.assert_allclose(w_out, 2 * 1 / total_weight, rtol=1e-6)
    np.testing.assert_allclose(u_in, u_out, rtol=1e-6)
    np.testing.assert_allclose(w_in / w_out, 5.0, rtol=1e-6)


def test_flow_loss_is_weighted_mean():
    # A uniform error gives the same loss whatever the weights: the normalisation removes
    # the dependence on how large the face is.
    pred = jnp.full((2, 2, 4, 4, 3), 0.5)
    target = jnp.zeros_like(pred)
    w = np.random.default_rng(100).uniform(1.0, 9.0, (2, 2, 4, 4, 1))
    np.testing.assert_allclose(flow_loss(pred, target, token_weights=w), 0.25, rtol=1e-6)


def test_flow_loss_errors():
    p = jnp.zeros((1, 2, 4, 4, 3))
    with pytest.raises(ValueError, match="differs from target shape"):
        flow_loss(p, jnp.zeros((1, 2, 4, 4, 2)))
    with pytest.raises(ValueError, match=r"axis 2 \(3\) neither equals, is 1, nor divides 4"):
        flow_loss(p, p, token_weights=jnp.ones((1, 2, 3, 2, 1)))
    with pytest.raises(ValueError, match="must have the rank"):
        flow_loss(p, p, token_weights=jnp.ones((1, 2, 2, 2)))
    with pytest.raises(ValueError, match=r"frame_mask of shape \(1, 3\)"):
        flow_loss(p, p, frame_mask=jnp.ones((1, 3)))


def test_motion_and_total_loss():
    pred = {"video": _normal(110, (2, 3, 4, 4, 2)), "motion": _normal(111, (2, 3, 5))}
    target = {"video": _normal(112, (2, 3, 4, 4, 2)), "motion": _normal(113, (2, 3, 5))}
    mask = np.array([[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    m_err = (np.asarray(pred["motion"]) - np.asarray(target["motion"])) ** 2
    np.testing.assert_allclose(motion_loss(pred["motion"], target["motion"], mask),
                               m_err[:, 1:].mean(), rtol=1e-5)
    loss, terms = jax.jit(lambda p, t: total_loss(p, t, frame_mask=mask, motion_weight=0.3))(
        pred, target)
    v_err = (np.asarray(pred["video"]) - np.asarray(target["video"])) ** 2
    np.testing.assert_allclose(terms["video"], v_err[:, 1:].mean(), rtol=1e-5)
    np.testing.assert_allclose(terms["motion"], m_err[:, 1:].mean(), rtol=1e-5)
    np.testing.assert_allclose(loss, terms["video"] + 0.3 * terms["motion"], rtol=1e-6)
    np.testing.assert_allclose(terms["total"], loss, rtol=1e-6)
    _, terms = total_loss({"video": pred["video"]}, {"video": target["video"]})
    assert float(terms["motion"]) == 0.0
    with pytest.raises(KeyError, match="'motion' must be in both"):
        total_loss(pred, {"video": target["video"]})


# ---------------------------------------------------------------- region weights

def test_region_mask_lands_in_right_latent_frame_and_token():
    t, h, w = 9, 32, 48   # 3 latent frames of 2 x 3 tokens
    for video_frame, latent in [(0, 0), (1, 1), (4, 1), (5, 2), (8, 2)]:
        mouth = np.zeros((1, t, h, w), np.float32)
        mouth[0, video_frame, 20, 40] = 1.0   # pixel (20, 40) is token (1, 2)
        weights = np.asarray(region_token_weights(
            None, mouth, None, face_weight=0.0, mouth_weight=2.0, eye_weight=0.0))
        assert weights.shape == (1, 3, 2, 3, 1)
        expected = np.ones((1, 3, 2, 3, 1), np.float32)
        expected[0, latent, 1, 2, 0] = 3.0
        np.testing.assert_array_equal(weights, expected, err_msg=f"video frame {video_frame}")


def test_region_weights_add_up_against_numpy():
    rng = np.random.default_rng(0)
    shape = (2, 5, 32, 32)
    face, mouth, eye = (rng.random(shape) > 0.9 for _ in range(3))
    got = np.asarray(region_token_weights(face, mouth, eye, face_weight=0.5, mouth_weight=3.0,
                                          eye_weight=1.5))
    expected = np.ones((2, 2, 2, 2, 1))
    groups = [[0], [1, 2, 3, 4]]
    for b in range(2):
        for lf, frames in enumerate(groups):
            for i in range(2):
                for j in range(2):
                    for mask, wgt in ((face, 0.5), (mouth, 3.0), (eye, 1.5)):
                        patch = mask[b, frames, 16 * i:16 * (i + 1), 16 * j:16 * (j + 1)]
                        expected[b, lf, i, j, 0] += wgt * float(patch.any())
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_region_weights_errors():
    good = np.zeros((1, 5, 32, 32))
    kw = dict(face_weight=1.0, mouth_weight=1.0, eye_weight=1.0)
    with pytest.raises(ValueError, match=r"shape \(1, 6, 32, 32\): T=6 .* 1 \+ 4k"):
        region_token_weights(np.zeros((1, 6, 32, 32)), None, None, **kw)
    with pytest.raises(ValueError, match=r"shape \(1, 5, 40, 32\): H=40 and W=32 .* 16"):
        region_token_weights(np.zeros((1, 5, 40, 32)), None, None, **kw)
    with pytest.raises(ValueError, match=r"must be \[B, T, H, W\]"):
        region_token_weights(np.zeros((5, 32, 32)), None, None, **kw)
    with pytest.raises(ValueError, match="share one shape"):
        region_token_weights(good, np.zeros((1, 9, 32, 32)), None, **kw)
    with pytest.raises(ValueError, match="at least one"):
        region_token_weights(None, None, None, **kw)
    assert latent_frames(1) == 1 and latent_frames(81) == 21
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        latent_frames(4)
