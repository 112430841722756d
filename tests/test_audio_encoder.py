"""Audio front end and encoder: numbers against numpy/scipy references, alignment, shapes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal
from flax import nnx

from avatarv_jax.layers import mel as mel_lib
from avatarv_jax.models.audio_encoder import (AudioEncoder, AudioEncoderConfig, apply_rope,
                                              num_video_frames, resample_frames)

SR = 16000


# ----------------------------------------------------------------------------- references


def ref_hz_to_mel(hz: float) -> float:
    """Slaney scale written from its definition: 3 mels per 200 Hz, then log steps of 6.4^(1/27)."""
    if hz < 1000.0:
        return 3.0 * hz / 200.0
    return 15.0 + 27.0 * math.log(hz / 1000.0) / math.log(6.4)


def ref_mel_to_hz(mel: float) -> float:
    if mel < 15.0:
        return 200.0 * mel / 3.0
    return 1000.0 * 6.4 ** ((mel - 15.0) / 27.0)


def ref_filterbank(sr=SR, n_fft=400, n_mels=80, fmin=0.0, fmax=8000.0) -> np.ndarray:
    """Triangles via np.interp, each scaled to unit area in Hz (Slaney normalisation)."""
    freqs = np.arange(n_fft // 2 + 1) * sr / n_fft
    lo_mel, hi_mel = ref_hz_to_mel(fmin), ref_hz_to_mel(fmax)
    edges = [ref_mel_to_hz(lo_mel + (hi_mel - lo_mel) * i / (n_mels + 1))
             for i in range(n_mels + 2)]
    out = np.zeros((len(freqs), n_mels))
    for m in range(n_mels):
        a, b, c = edges[m], edges[m + 1], edges[m + 2]
        out[:, m] = np.interp(freqs, [a, b, c], [0.0, 1.0, 0.0], left=0.0, right=0.0) * 2 / (c - a)
    return out


def ref_log_mel(wave: np.ndarray, n_fft=400, hop=160, n_mels=80) -> np.ndarray:
    """One wave [N] -> [frames, n_mels], frame by frame in float64."""
    window = scipy.signal.get_window("hann", n_fft, fftbins=True)  # periodic
    padded = np.pad(wave.astype(np.float64), n_fft // 2, mode="reflect")
    count = 1 + len(wave) // hop
    power = np.stack([np.abs(np.fft.rfft(padded[k * hop: k * hop + n_fft] * window)) ** 2
                      for k in range(count)])
    spec = np.log10(np.maximum(power @ ref_filterbank(SR, n_fft, n_mels), 1e-10))
    spec = np.maximum(spec, spec.max() - 8.0)
    return (spec + 4.0) / 4.0


forward = nnx.jit(lambda model, wave: model(wave))


def build(cfg, seed=0):
    return AudioEncoder(cfg, nnx.Rngs(seed))


def noise(seed, *shape, scale=0.1):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


# ----------------------------------------------------------------------------- mel


def test_mel_scale_known_points_and_round_trip():
    assert float(mel_lib.hz_to_mel(1000.0)) == pytest.approx(15.0)
    assert float(mel_lib.hz_to_mel(8000.0)) == pytest.approx(ref_hz_to_mel(8000.0))
    hz = np.array([0.0, 50.0, 999.0, 1000.0, 1234.5, 7999.0])
    np.testing.assert_allclose([ref_hz_to_mel(h) for h in hz], mel_lib.hz_to_mel(hz), rtol=1e-12)
    np.testing.assert_allclose(mel_lib.mel_to_hz(mel_lib.hz_to_mel(hz)), hz, atol=1e-9)


def test_filterbank_matches_reference_and_has_unit_area():
    fb = mel_lib.mel_filterbank(SR, 400, 80, 0.0, 8000.0)
    assert fb.shape == (201, 80)
    np.testing.assert_allclose(fb, ref_filterbank(), atol=1e-10)
    # Slaney normalisation: each triangle integrates to ~1 over Hz (exact up to sampling;
    # check the wide high bands where 40 Hz bins resolve the triangle well).
    area = fb.sum(axis=0) * (SR / 400)
    np.testing.assert_allclose(area[50:79], 1.0, rtol=0.03)
    assert not fb.flags.writeable


def test_filterbank_rejects_bad_range():
    with pytest.raises(ValueError, match="fmax"):
        mel_lib.mel_filterbank(SR, 400, 80, 0.0, 9000.0)


def test_log_mel_matches_numpy_reference():
    t = np.arange(12345) / SR
    wave = (0.5 * np.sin(2 * np.pi * 440 * t) + noise(0, 12345)).astype(np.float32)
    # A tone then digital silence: exercises both the 1e-10 clamp and the max - 8 floor.
    gated = (0.5 * np.sin(2 * np.pi * 3000 * t) * (t < 0.4)).astype(np.float32)
    got = np.asarray(mel_lib.log_mel_spectrogram(jnp.asarray(np.stack([wave, gated]))))
    assert got.shape == (2, 1 + 12345 // 160, 80)
    for i, w in enumerate([wave, gated]):
        ref = ref_log_mel(w)
        np.testing.assert_allclose(got[i], ref, atol=1e-4)
    assert np.mean(ref == ref.min()) > 0.1  # the floor was exercised
    assert ref.max() - ref.min() == pytest.approx(2.0)  # 8 log10 units / 4


@pytest.mark.parametrize("band", [10, 20, 30, 45, 60, 75])
def test_sine_at_band_centre_lands_in_that_band(band):
    centre_hz = ref_mel_to_hz(ref_hz_to_mel(8000.0) * (band + 1) / 81)
    t = np.arange(SR) / SR
    wave = np.sin(2 * np.pi * centre_hz * t).astype(np.float32)[None]
    spec = np.asarray(mel_lib.log_mel_spectrogram(jnp.asarray(wave)))[0]
    assert np.argmax(spec[5:-5].mean(axis=0)) == band


def test_log_mel_jit_batched_and_click_alignment():
    rng = np.random.default_rng(1)
    waves = (rng.standard_normal((3, 16000)) * 0.01).astype(np.float32)
    f = jax.jit(mel_lib.log_mel_spectrogram)
    batch = np.asarray(f(jnp.asarray(waves)))
    single = np.asarray(f(jnp.asarray(waves[1:2])))
    np.testing.assert_allclose(batch[1:2], single, atol=1e-6)
    # A click at 0.6 s must change mel frame 60 (frame k is centred at k / 100 s) most.
    clicked = waves[:1].copy()
    clicked[0, 9600] += 1.0
    diff = np.abs(np.asarray(f(jnp.asarray(clicked))) - batch[:1])[0].sum(axis=-1)
    assert int(np.argmax(diff)) == 60
    assert diff[np.r_[0:55, 66:101]].max() < 0.05 * diff[60]


def test_log_mel_errors():
    with pytest.raises(ValueError, match="batch, samples"):
        mel_lib.log_mel_spectrogram(jnp.zeros((100,)))
    with pytest.raises(ValueError, match="200"):
        mel_lib.log_mel_spectrogram(jnp.zeros((1, 150)))


# ----------------------------------------------------------------------------- encoder


@pytest.fixture(scope="module")
def encoder():
    return build(AudioEncoderConfig.tiny(external_dim=24))


@pytest.mark.parametrize("samples,frames", [(16000, 25), (16160, 26), (641, 2)])
def test_output_frame_counts(encoder, samples, frames):
    assert num_video_frames(samples, SR, 25) == frames
    out = forward(encoder, jnp.asarray(noise(2, 1, samples)))
    assert out.shape == (1, frames, 32)


def test_num_video_frames_counts_partial_frames():
    counts = [num_video_frames(n, SR, 25) for n in (1, 639, 640, 641, 8000, 48000, 48001)]
    assert counts == [1, 1, 1, 2, 13, 75, 76]


def test_num_video_frames_float_rates():
    assert num_video_frames(16000, SR, 30) == 30
    assert num_video_frames(16000 * 100, SR, 29.97) == 2997
    assert num_video_frames(0) == 0
    with pytest.raises(ValueError, match="num_samples"):
        num_video_frames(-1)


def test_other_fps_is_resampled():
    enc = build(AudioEncoderConfig.tiny(fps=30.0))
    wave = jnp.asarray(noise(3, 1, 16000))
    emb = np.asarray(nnx.jit(lambda m, w: m.frame_embeddings(w))(enc, wave))
    assert emb.shape == (1, 30, 32)
    conv = np.asarray(jax.nn.gelu(enc.conv2(jax.nn.gelu(enc.conv1(
        mel_lib.log_mel_spectrogram(wave))))))[0]
    times = np.arange(26) / 25.0
    expect = np.stack([np.interp(np.arange(30) / 30.0, times, conv[:, d]) for d in range(32)], -1)
    np.testing.assert_allclose(emb[0], expect, atol=1e-5)
    assert forward(enc, wave).shape == (1, 30, 32)


def test_click_changes_frames_near_its_time(encoder):
    """A click at 0.6 s must change output frame 15 (= 0.6 s * 25 fps) most."""
    base = noise(4, 1, 32000)
    clicked = base.copy()
    clicked[0, 9600:9604] += np.array([1.0, -1.0, 1.0, -1.0], np.float32)
    delta = np.linalg.norm(np.asarray(forward(encoder, jnp.asarray(clicked))
                                      - forward(encoder, jnp.asarray(base))), axis=-1)[0]
    assert int(np.argmax(delta)) == 15
    far = np.r_[0:12, 19:50]  # attention spreads some of the change; the residual keeps most
    assert delta[far].max() < 0.6 * delta[15]


@nnx.jit
def embedding_grad(model, wave, frame):
    def frame_energy(w):
        emb = model.frame_embeddings(w)[0]
        return jnp.sum(jnp.where(jnp.arange(emb.shape[0])[:, None] == frame, emb, 0.0) ** 2)
    return jax.grad(frame_energy)(wave)


@pytest.mark.parametrize("frame", [0, 15, 49])
def test_frame_embedding_receptive_field_is_centred_on_its_time(encoder, frame):
    """Before attention, video frame f sees exactly the samples within 680 of f * 640.

    Mel frame k covers samples [160 k - 200, 160 k + 200); the two stride-2 convolutions give
    frame f mel frames 4 f - 3 .. 4 f + 3. Anything wider or shifted means misaligned padding.
    """
    wave = jnp.asarray(noise(5, 1, 32000))
    energy = np.asarray(embedding_grad(encoder, wave, frame))[0] ** 2
    inside = np.zeros(32000, bool)
    inside[max(0, 640 * frame - 680): 640 * frame + 680] = True
    assert energy[~inside].sum() == 0.0
    assert energy[inside].sum() > 0.0
    if 0 < frame < 49:  # away from the edges the support is symmetric about f / fps
        centroid = (energy * np.arange(32000)).sum() / energy.sum()
        assert abs(centroid - 640 * frame) < 160


def test_batch_independence(encoder):
    waves = noise(6, 3, 16000)  # the length test_output_frame_counts compiled already
    waves[2] *= 5.0
    batch = np.asarray(forward(encoder, jnp.asarray(waves)))
    for i in range(3):
        single = np.asarray(forward(encoder, jnp.asarray(waves[i:i + 1])))[0]
        np.testing.assert_allclose(batch[i], single, atol=1e-5)


def test_jit_and_grad_are_finite(encoder):
    graphdef, params, rest = nnx.split(encoder, nnx.Param, ...)
    wave = jnp.asarray(noise(7, 2, 8000))
    feats = jnp.asarray(noise(12, 2, 10, 24, scale=1.0))

    @jax.jit
    def loss_fn(p, w):
        model = nnx.merge(graphdef, p, rest)
        return jnp.mean(model(w) ** 2) + jnp.mean(model.from_features(feats, 50.0) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params, wave)
    assert np.isfinite(float(loss))
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    assert len(leaves) == len(jax.tree_util.tree_leaves(params))
    for path, g in leaves:
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), path
        assert np.abs(g).max() > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"
    np.testing.assert_allclose(float(loss), float(loss_fn(params, wave)), rtol=1e-6)


def test_stacked_layers_carry_layer_axis(encoder):
    q = encoder.blocks.attn.query
    assert q.shape == (2, 32, 4, 8)
    assert tuple(q.get_metadata()["out_sharding"]) == ("layers", "embed", "heads", "kv")


def test_remat_gives_same_output():
    cfg = AudioEncoderConfig.tiny()
    wave = jnp.asarray(noise(8, 1, 4000))
    plain = forward(build(cfg, 1), wave)
    remat = forward(build(AudioEncoderConfig.tiny(remat=True), 1), wave)
    np.testing.assert_allclose(np.asarray(plain), np.asarray(remat), atol=1e-6)


def test_bf16_compute_runs():
    enc = build(AudioEncoderConfig.tiny(dtype=jnp.bfloat16))
    out = forward(enc, jnp.asarray(noise(9, 1, 4000)))
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))
    assert enc.head.kernel[...].dtype == jnp.float32


def test_rope_matches_complex_rotation_and_is_relative():
    x = np.random.default_rng(13).standard_normal((1, 7, 2, 6)).astype(np.float32)
    got = np.asarray(apply_rope(jnp.asarray(x), 100.0))
    # Pair (i, i + 3) as a complex number turned by t * 100^(-2i/6).
    z = x[..., :3] + 1j * x[..., 3:]
    angle = np.arange(7)[:, None] * 100.0 ** (-np.arange(3) * 2 / 6)
    turned = z * np.exp(1j * angle)[None, :, None, :]
    np.testing.assert_allclose(got, np.concatenate([turned.real, turned.imag], -1), atol=1e-5)
    # Dot products of rotated copies of one vector depend only on the position difference.
    same = np.asarray(apply_rope(jnp.asarray(np.repeat(x[:, :1], 7, axis=1)), 100.0))[0, :, 0]
    assert np.dot(same[1], same[3]) == pytest.approx(np.dot(same[4], same[6]), rel=1e-5)


def test_config_validation():
    with pytest.raises(ValueError, match="num_heads"):
        AudioEncoderConfig.tiny(num_heads=5)
    with pytest.raises(ValueError, match="even"):
        AudioEncoderConfig.tiny(width=36, num_heads=4)
    base = AudioEncoderConfig.base()
    assert (base.width, base.num_layers, base.num_heads, base.mlp_dim, base.out_dim) == (
        512, 6, 8, 2048, 768)
    assert base.conv_fps == 25.0


# ----------------------------------------------------------------------------- from_features


def test_resample_matches_np_interp():
    feats = np.random.default_rng(10).standard_normal((2, 37, 5)).astype(np.float32)
    for src, dst, count in [(50.0, 25.0, 19), (30.0, 25.0, 31), (50.0, 25.0, 25)]:
        got = np.asarray(resample_frames(jnp.asarray(feats), src, dst, count))
        times = np.arange(count) / dst
        for b in range(2):
            for d in range(5):
                np.testing.assert_allclose(got[b, :, d],
                                           np.interp(times, np.arange(37) / src, feats[b, :, d]),
                                           atol=1e-6)


def test_from_features_matches_numpy(encoder):
    feats = np.random.default_rng(11).standard_normal((2, 50, 24)).astype(np.float32) * 3 + 1
    out = np.asarray(encoder.from_features(jnp.asarray(feats), 50.0))
    assert out.shape == (2, 25, 32)
    # Independent pipeline: np.interp to 25 fps -> layer norm -> dense with the module's weights.
    times = np.arange(25) / 25.0
    x = np.stack([np.stack([np.interp(times, np.arange(50) / 50.0, feats[b, :, d])
                            for d in range(24)], -1) for b in range(2)])
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    norm, proj = encoder.external_norm, encoder.external_proj
    x = x * np.asarray(norm.scale[...]) + np.asarray(norm.bias[...])
    expect = x @ np.asarray(proj.kernel[...]) + np.asarray(proj.bias[...])
    np.testing.assert_allclose(out, expect, atol=1e-4)
    assert encoder.from_features(jnp.asarray(feats), 50.0, num_frames=10).shape == (2, 10, 32)
    assert encoder.from_features(jnp.asarray(feats[:, :49]), 50.0).shape == (2, 25, 32)
    assert encoder.from_features(jnp.zeros((1, 51, 24)), 50.0).shape == (1, 26, 32)


def test_from_features_width_mismatch_names_both_widths(encoder):
    with pytest.raises(ValueError, match=r"1024.*external_dim=24"):
        encoder.from_features(jnp.zeros((1, 50, 1024)), 50.0)


def test_from_features_requires_external_dim():
    enc = nnx.eval_shape(lambda: AudioEncoder(AudioEncoderConfig.tiny(), nnx.Rngs(0)))
    with pytest.raises(ValueError, match="external_dim"):
        enc.from_features(jnp.zeros((1, 50, 768)), 50.0)
