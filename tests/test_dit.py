"""The DiT: cached == joint, frame-aligned audio, per-frame timesteps, the Wan building blocks."""

import dataclasses

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from avatarv_jax.layers.rope import apply_rope, axis_dims, rope_tables, segment_positions
from avatarv_jax.models.dit import DiT, patchify, unpatchify
from avatarv_jax.models.motion import pack_motion, unpack_motion
from avatarv_jax.testing import perturb_zero_init, random_inputs, tiny_dit_config


@pytest.fixture(scope="module")
def model():
    return perturb_zero_init(DiT(tiny_dit_config(), rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("ref_frames,prefix_frames", [(1, 0), (2, 1), (5, 0), (3, 2)])
def test_cached_denoise_equals_joint_forward(model, ref_frames, prefix_frames):
    cfg = model.cfg
    gen, ref = random_inputs(cfg, gen_frames=3, ref_frames=ref_frames, size=(4, 6),
                             prefix_frames=prefix_frames, seed=ref_frames)
    ref = ref.replace(valid_frames=jnp.array([ref_frames, max(ref_frames - 1, 0)]))
    joint = jax.jit(lambda g, r: model(g, r))(gen, ref)
    ref_cache = jax.jit(model.encode_reference)(ref)
    cond_cache = jax.jit(model.encode_conditions)(gen.text, gen.audio)
    cached = jax.jit(lambda g, rc, cc: model(g, ref_cache=rc, cond_cache=cc))(
        gen, ref_cache, cond_cache)
    for name in ("video", "motion"):
        assert np.abs(np.asarray(joint[name] - cached[name])).max() <= 1e-5, name
    # The same caches serve another sampling step (new noisy latents and timesteps).
    step2 = gen.replace(latents=gen.latents * 0.5, timesteps=gen.timesteps * 0.3)
    np.testing.assert_allclose(model(step2, ref)["video"],
                               model(step2, ref_cache=ref_cache, cond_cache=cond_cache)["video"],
                               atol=1e-5)


def test_per_frame_timesteps(model):
    cfg = model.cfg
    gen, ref = random_inputs(cfg, gen_frames=3, ref_frames=1, size=(4, 4))
    out = model(gen, ref)
    # Changing only frame 0's timestep (a clean prefix) changes the outputs.
    changed = model(gen.replace(timesteps=gen.timesteps.at[:, 0].set(0.0)), ref)
    assert not np.allclose(out["video"], changed["video"])


def test_audio_is_frame_aligned():
    # One layer, GEN frames see only themselves: latent frame l depends on its own audio window.
    cfg = tiny_dit_config(num_layers=1, gen_window=0, audio_context=0)
    model = perturb_zero_init(DiT(cfg, rngs=nnx.Rngs(1)))
    gen, _ = random_inputs(cfg, gen_frames=3, ref_frames=0, size=(4, 4))
    base = model(gen)["video"]
    for video_frame, latent_frame in [(0, 0), (2, 1), (4, 1), (5, 2), (8, 2)]:
        out = model(gen.replace(audio=gen.audio.at[:, video_frame].add(3.0)))["video"]
        diff = np.abs(np.asarray(out - base)).max(axis=(0, 2, 3, 4))
        assert diff[latent_frame] > 0 and np.all(np.delete(diff, latent_frame) == 0), diff
    dropped = model(gen.replace(audio_mask=jnp.zeros(2)))["video"]
    silent = model(gen.replace(audio=None))["video"]
    np.testing.assert_allclose(dropped, silent, atol=1e-6)


def test_text_reaches_video_tokens_only():
    cfg = tiny_dit_config(num_layers=1, gen_window=0)
    model = perturb_zero_init(DiT(cfg, rngs=nnx.Rngs(2)))
    gen, _ = random_inputs(cfg, gen_frames=2, ref_frames=0, size=(4, 4))
    base = model(gen)
    out = model(gen.replace(text=gen.text + 1.0))
    assert not np.allclose(base["video"], out["video"])
    np.testing.assert_array_equal(np.asarray(base["motion"]), np.asarray(out["motion"]))


def test_zero_initialised_audio_is_a_no_op_at_init():
    cfg = tiny_dit_config()
    model = DiT(cfg, rngs=nnx.Rngs(3))
    gen, _ = random_inputs(cfg, gen_frames=2, ref_frames=0, size=(4, 4))
    np.testing.assert_array_equal(np.asarray(model(gen)["video"]),
                                  np.asarray(model(gen.replace(audio=None))["video"]))


def test_sr_refiner_uses_condition_latents():
    cfg = tiny_dit_config(cond_channels=16, gen_window=1)
    model = perturb_zero_init(DiT(cfg, rngs=nnx.Rngs(4)))
    gen, ref = random_inputs(cfg, gen_frames=3, ref_frames=2, size=(4, 4))
    with pytest.raises(ValueError, match="cond_latents"):
        model(gen, ref)
    cond = jax.random.normal(jax.random.key(9), gen.latents.shape)
    a = model(gen.replace(cond_latents=cond), ref)["video"]
    b = model(gen.replace(cond_latents=cond * 2), ref)["video"]
    assert a.shape == gen.latents.shape and not np.allclose(a, b)


def test_errors_name_the_problem(model):
    cfg = model.cfg
    gen, ref = random_inputs(cfg, gen_frames=2, ref_frames=1, size=(4, 4))
    with pytest.raises(ValueError, match="one per latent frame"):
        model(gen.replace(timesteps=gen.timesteps[:, 0]), ref)
    with pytest.raises(ValueError, match="REF frames have"):
        model(gen, ref.replace(motion=None))
    with pytest.raises(ValueError, match="audio has shape"):
        model(gen.replace(audio=gen.audio[:, :3]), ref)
    with pytest.raises(ValueError, match="not divisible by the patch"):
        patchify(jnp.zeros((1, 1, 5, 4, 16)), (2, 2))


def test_bfloat16_forward_is_finite_and_close_to_fp32():
    cfg = tiny_dit_config()
    model32 = perturb_zero_init(DiT(cfg, rngs=nnx.Rngs(5)))
    model16 = nnx.merge(nnx.graphdef(DiT(dataclasses.replace(cfg, dtype="bfloat16"),
                                         rngs=nnx.Rngs(5))), nnx.state(model32))
    gen, ref = random_inputs(cfg, gen_frames=2, ref_frames=1, size=(4, 4))
    a, b = model32(gen, ref)["video"], model16(gen, ref)["video"]
    assert np.all(np.isfinite(b))
    assert np.abs(np.asarray(a - b)).max() / np.abs(np.asarray(a)).max() < 5e-2


def test_patchify_round_trip():
    x = jax.random.normal(jax.random.key(0), (2, 3, 6, 8, 5))
    np.testing.assert_array_equal(np.asarray(unpatchify(patchify(x, (2, 2)), (3, 4), (2, 2))),
                                  np.asarray(x))


def test_motion_packing_round_trip():
    m = jax.random.normal(jax.random.key(0), (2, 9, 12))
    packed = pack_motion(m)
    assert packed.shape == (2, 3, 48)
    np.testing.assert_allclose(unpack_motion(packed), m, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(packed[:, 1, :12]), np.asarray(m[:, 1]))
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        pack_motion(m[:, :4])


def test_rope_matches_complex_rotation():
    head_dim = 20
    assert axis_dims(128) == (44, 42, 42)
    pos = segment_positions(np.array([0, 3]), (2, 3), motion_token=True)
    assert pos.shape == (14, 3) and tuple(pos[6]) == (0, -1, -1) and tuple(pos[7]) == (3, 0, 0)
    cos, sin = rope_tables(pos, head_dim)
    x = np.random.default_rng(0).normal(size=(1, 14, 2, head_dim)).astype(np.float32)
    got = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    # Reference: complex multiplication of interleaved pairs by exp(i * angle).
    t, h, w = axis_dims(head_dim)
    freqs = [1.0 / 10000 ** (np.arange(0, d, 2) / d) for d in (t, h, w)]
    angles = np.concatenate([pos[:, i:i + 1] * f for i, f in enumerate(freqs)], axis=-1)
    z = x[..., 0::2] + 1j * x[..., 1::2]
    rz = z * np.exp(1j * angles)[None, :, None, :]
    want = np.stack([rz.real, rz.imag], axis=-1).reshape(x.shape)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_motion_dim_matches_avatarworld():
    from avatarv_jax.config import MOTION_DIM
    from avatarv_jax.data.avatarworld.motion import MOTION_DIM as WORLD_MOTION_DIM
    assert MOTION_DIM == WORLD_MOTION_DIM


def test_token_padding_for_aligned_gemms_changes_nothing(model, monkeypatch):
    """Dense pads the token axis to 8-aligned GEMM rows on GPUs; forced on here (every size),
    the outputs and parameter gradients equal the unpadded ones."""
    from avatarv_jax.layers import linear
    gen, ref = random_inputs(model.cfg, gen_frames=3, ref_frames=2, size=(4, 6), seed=5)
    graphdef, state = nnx.split(model)

    def loss(state):
        out = nnx.merge(graphdef, state)(gen, ref)
        return jnp.mean(out["video"] ** 2) + jnp.mean(out["motion"] ** 2), out

    results = {}
    for mode in ("off", "on"):
        monkeypatch.setattr(linear, "row_padding", mode)
        monkeypatch.setattr(linear, "MIN_PADDED_ROWS", 0)
        hidden = jnp.zeros((2, 3, 25, model.cfg.dim))        # 3 frames x (24 patches + motion)
        assert linear._token_padding(hidden) == (7 if mode == "on" else 0)
        results[mode] = jax.value_and_grad(loss, has_aux=True)(state)
    (_, out_off), grads_off = results["off"]
    (_, out_on), grads_on = results["on"]
    for key in ("video", "motion"):
        np.testing.assert_allclose(out_on[key], out_off[key], atol=1e-6)
    worst = max(jax.tree.leaves(jax.tree.map(
        lambda a, b: float(jnp.abs(a - b).max()), grads_on, grads_off)))
    assert worst <= 1e-6, worst
