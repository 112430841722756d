"""The training objective (condition dropout, region weights) and guided chunk sampling."""

import numpy as np
import jax
import jax.numpy as jnp
import ml_collections
import pytest
from flax import nnx

from avatarv_jax.diffusion.flow import sigma_to_timestep
from avatarv_jax.diffusion.guidance import ConditionDropout, guided_velocity
from avatarv_jax.diffusion.objective import TrainBatch, flow_matching_loss
from avatarv_jax.inference.guided import encode_guidance_caches, sample_chunk
from avatarv_jax.models.dit import DiT, GenInputs
from avatarv_jax.testing import perturb_zero_init, random_inputs, tiny_dit_config

FLOW = ml_collections.ConfigDict(dict(logit_mean=0.0, logit_std=1.0, shift=3.0, face_weight=0.5,
                                      mouth_weight=4.0, eye_weight=0.5, motion_weight=1.0))


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_dit_config()
    model = perturb_zero_init(DiT(cfg, rngs=nnx.Rngs(0)))
    gen, ref = random_inputs(cfg, gen_frames=2, ref_frames=2, size=(4, 4))
    batch = TrainBatch(latents=gen.latents, text=gen.text, motion=gen.motion, audio=gen.audio,
                       ref_latents=ref.latents, ref_motion=ref.motion, ref_audio=ref.audio)
    return model, batch


def _loss(model, batch, dropout, key=0, num_prefix=0):
    return jax.jit(lambda b: flow_matching_loss(model, b, jax.random.key(key), flow_cfg=FLOW,
                                                dropout=dropout, num_prefix=num_prefix))(batch)


@pytest.mark.parametrize("dropped,field,change", [
    ("p_text", "text", lambda x: x + 1.0),
    ("p_audio", "audio", lambda x: x + 1.0),
    ("p_ref", "ref_latents", lambda x: x + 1.0),
])
def test_condition_dropout_removes_exactly_that_condition(setup, dropped, field, change):
    model, batch = setup
    changed = batch.replace(**{field: change(getattr(batch, field))})
    keep_all = ConditionDropout(p_text=0.0, p_audio=0.0, p_ref=0.0, p_all=0.0)
    loss, terms = _loss(model, batch, keep_all)
    assert float(terms["keep_text"]) == 1.0
    assert float(_loss(model, changed, keep_all)[0]) != float(loss)     # the condition is used
    drop = ConditionDropout(**{"p_text": 0.0, "p_audio": 0.0, "p_ref": 0.0, "p_all": 0.0,
                               dropped: 1.0})
    a, terms = _loss(model, batch, drop)
    b, _ = _loss(model, changed, drop)
    assert float(terms["keep_" + dropped[2:]]) == 0.0
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)       # ... and dropped, unseen


def test_region_weights_change_the_loss(setup):
    model, batch = setup
    keep = ConditionDropout(0.0, 0.0, 0.0, 0.0)
    mouth = jnp.zeros((2, 5, 32, 32), bool).at[:, :, 16:, :16].set(True)
    plain, _ = _loss(model, batch, keep)
    weighted, _ = _loss(model, batch.replace(mouth_mask=mouth), keep)
    assert abs(float(weighted) - float(plain)) > 1e-4


def test_region_weights_follow_the_vae_stride_of_the_masks(setup):
    # The same mouth tokens drawn at stride 8 (32 px masks over a 4x4 latent) and at stride 4
    # (16 px, the tiny_s4 VAE) weight the loss identically; a mask at the wrong stride for the
    # latent grid is refused.
    model, batch = setup
    keep = ConditionDropout(0.0, 0.0, 0.0, 0.0)
    mouth8 = jnp.zeros((2, 5, 32, 32), bool).at[:, :, 16:, :16].set(True)
    mouth4 = jnp.zeros((2, 5, 16, 16), bool).at[:, :, 8:, :8].set(True)
    a, _ = _loss(model, batch.replace(mouth_mask=mouth8), keep)
    b, _ = _loss(model, batch.replace(mouth_mask=mouth4), keep)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
    with pytest.raises(ValueError, match="not a multiple of the latent width"):
        _loss(model, batch.replace(mouth_mask=jnp.zeros((2, 5, 18, 18), bool)), keep)


def test_prefix_frames_are_not_in_the_loss(setup):
    model, batch = setup
    keep = ConditionDropout(0.0, 0.0, 0.0, 0.0)
    a, _ = _loss(model, batch, keep, num_prefix=1)
    # The prefix latents are clean inputs: changing them changes the loss only through the
    # model's input, never through the target of frame 0 (which is excluded).
    b, _ = _loss(model, batch.replace(latents=batch.latents.at[:, 0].add(1.0)), keep, num_prefix=1)
    assert np.isfinite(float(a)) and float(a) != float(b)


def test_guided_step_combines_three_passes_as_documented(setup):
    model, batch = setup
    cfg = model.cfg
    gen, ref = random_inputs(cfg, batch=1, gen_frames=2, ref_frames=2, size=(4, 4), seed=3)
    ref_cache = model.encode_reference(ref)
    caches = encode_guidance_caches(model, gen.text, gen.audio, ref_cache, num_frames=2)
    noise = {"video": gen.latents, "motion": gen.motion}
    sigmas = jnp.array([1.0, 0.75])
    text_scale, audio_scale = 3.0, 2.0
    got = sample_chunk(model, caches, noise, sigmas, text_scale=text_scale,
                       audio_scale=audio_scale)

    # The same step from three joint forwards, each with its conditions stated explicitly.
    t = jnp.full((1, 2), sigma_to_timestep(1.0))
    x = GenInputs(latents=gen.latents, timesteps=t, motion=gen.motion, audio=gen.audio)
    v_full = model(x.replace(text=gen.text), ref)
    v_text = model(x.replace(text=gen.text, audio_mask=jnp.zeros(1)), ref)
    v_uncond = model(x.replace(text=jnp.zeros_like(gen.text), audio_mask=jnp.zeros(1)))
    v = guided_velocity(v_uncond, v_text, v_full, text_scale=text_scale, audio_scale=audio_scale)
    for k in ("video", "motion"):
        np.testing.assert_allclose(got[k], noise[k] - 0.25 * v[k], atol=1e-4)
    # Scales of 1 need one pass: the full conditional velocity alone.
    one = sample_chunk(model, caches, noise, sigmas, text_scale=1.0, audio_scale=1.0)
    np.testing.assert_allclose(one["video"], noise["video"] - 0.25 * v_full["video"], atol=1e-4)
