"""The audio a training step encodes equals what inference encodes for the same frames.

The frozen audio encoder attends over its whole input and normalises each input to its own
loudest frame, so a frame's features depend on the window around it. Inference encodes a
chunk with ``inference.audio_context_frames`` of audio either side; the pipelines carry the
same context (``data.audio_context_frames``) and the step keeps the clip's own frames.
"""

import types

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from avatarv_jax.data.pipelines.transforms import _audio as window_audio
from avatarv_jax.inference.pipeline import Pipeline
from avatarv_jax.models.audio_encoder import AudioEncoder, AudioEncoderConfig
from avatarv_jax.training.batch import audio_context, check_batch, clip_features, clip_wave
from avatarv_jax.training.stage_config import stage_config

SPF = 640


@pytest.fixture(scope="module")
def encoder():
    return AudioEncoder(AudioEncoderConfig.tiny(), nnx.Rngs(4))


def _speech(frames, seed=0):
    """Bursts of noise with pauses: loudness that varies across the clip."""
    rng = np.random.default_rng(seed)
    wave = 0.2 * rng.standard_normal(frames * SPF).astype(np.float32)
    gain = np.repeat(rng.uniform(0.0, 1.0, frames) > 0.4, SPF).astype(np.float32)
    return wave * gain


def _inference_features(encoder, wave, start, count, context):
    stub = types.SimpleNamespace(settings=types.SimpleNamespace(audio_context_frames=context),
                                 _audio_features=lambda w: encoder(w))
    return np.asarray(Pipeline._chunk_audio(stub, wave, start, count))


@pytest.mark.parametrize("start", [0, 12, 31])          # at the clip's start, inside, at its end
def test_training_features_equal_inference_features(encoder, start):
    wave, t, m = _speech(40), 9, 8
    samples = window_audio(wave, start, t, m)                # what the pipeline puts in a batch
    assert samples.shape == ((t + 2 * m) * SPF,)
    train = np.asarray(clip_features(encoder, jnp.asarray(samples)[None], t))
    infer = _inference_features(encoder, wave, start, t, m)
    assert train.shape == infer.shape == (1, t, encoder.cfg.out_dim)
    np.testing.assert_allclose(train, infer, atol=1e-5)
    # Without the context the same frames get other features: the window matters.
    bare = np.asarray(clip_features(encoder, jnp.asarray(window_audio(wave, start, t))[None], t))
    assert np.max(np.abs(bare - infer)) > 1e-2


def test_window_audio_pads_outside_the_clip_and_clip_wave_undoes_it():
    wave, t, m = _speech(20, seed=1), 5, 3
    got = window_audio(wave, 16, t, m)                       # frames 13 .. 23 of a 20-frame clip
    np.testing.assert_array_equal(got[:7 * SPF], wave[13 * SPF:])
    assert got.shape == (11 * SPF,) and not got[7 * SPF:].any()
    got = window_audio(wave, 1, t, m)                        # frames -2 .. 8
    assert not got[:2 * SPF].any()
    np.testing.assert_array_equal(got[2 * SPF:], wave[:9 * SPF])
    np.testing.assert_array_equal(clip_wave(got[None], t)[0], wave[SPF:6 * SPF])
    assert audio_context(got.size, t) == m and audio_context(t * SPF, t) == 0


def test_bad_audio_lengths_are_named():
    with pytest.raises(ValueError, match="same whole number of frames of context"):
        audio_context(9 * SPF + SPF, 9)                      # one frame: not symmetric
    with pytest.raises(ValueError, match="9 frames at 25 fps need 5760"):
        audio_context(8 * SPF, 9)
    batch = {"text_ids": 0, "text_mask": 0, "video": np.zeros((1, 9, 8, 8, 3), np.uint8),
             "audio": np.zeros((1, 9 * SPF + 100), np.float32), "ref_video": 0}
    with pytest.raises(ValueError, match="audio has 5860 samples"):
        check_batch(batch, "a2v")


def test_stage_configs_train_with_the_inference_context():
    for stage in ("a2v", "sft", "grpo"):
        cfg = stage_config(stage, "tiny")
        assert cfg.data.audio_context_frames == cfg.inference.audio_context_frames > 0
