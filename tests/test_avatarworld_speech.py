"""AvatarWorld speech: espeak-ng languages, the synthetic fallback and the mouth track."""

import numpy as np
import pytest

from avatarv_jax.data.avatarworld import speech

needs_espeak = pytest.mark.skipif(not speech.espeak_available(), reason="espeak-ng not installed")
SR = speech.SAMPLE_RATE


@needs_espeak
@pytest.mark.parametrize("language", speech.LANGUAGE_CODES)
def test_every_language_speaks_with_pauses(language):
    rng = np.random.default_rng(0)
    said = speech.make_speech(rng, 5 * SR, language, "m3", 50, 160, backend="espeak-ng")
    assert said.backend == "espeak-ng" and said.audio.dtype == np.float32
    assert said.audio.shape == (5 * SR,)
    assert abs(float(np.abs(said.audio).max()) - speech.SPEECH_PEAK) < 1e-3
    assert said.transcript and said.segments[0][0] >= int(0.1 * SR)  # silent lead-in
    silent = speech.silent_frames(said.audio)
    assert 0.05 < silent.mean() < 0.7


@needs_espeak
def test_voices_differ():
    a = speech.espeak_utterance("Hello there", "en-us", "m3", 30, 150)
    b = speech.espeak_utterance("Hello there", "en-us", "f4", 70, 150)
    assert a.size > 0.3 * SR and b.size > 0.3 * SR
    assert a.size != b.size or not np.allclose(a, b)


def test_missing_espeak_gives_a_clear_error_and_auto_falls_back(monkeypatch):
    monkeypatch.setattr(speech.shutil, "which", lambda name: None)
    speech.espeak_available.cache_clear()
    try:
        with pytest.raises(speech.SpeechBackendError, match="apt-get install espeak-ng"):
            speech.make_speech(np.random.default_rng(0), SR, "en", "m3", 50, 160,
                               backend="espeak-ng")
        said = speech.make_speech(np.random.default_rng(0), 3 * SR, "en", "m3", 50, 160,
                                  backend="auto")
        assert said.backend == "synthetic"
        track = speech.mouth_track(said.audio)
        assert track.max() > 0.5 and (track == 0).sum() > 3
    finally:
        speech.espeak_available.cache_clear()
    with pytest.raises(ValueError, match="speech backend"):
        speech.resolve_backend("festival")


def test_mouth_track_is_zero_in_silence_and_grows_with_loudness():
    assert np.array_equal(speech.mouth_track(np.zeros(SR, np.float32)), np.zeros(25))
    t = np.arange(SR) / SR
    tone = np.sin(2 * np.pi * 220 * t).astype(np.float32)
    quiet, loud = speech.mouth_track(0.02 * tone), speech.mouth_track(0.3 * tone)
    assert (quiet[2:-2] > 0).all() and (loud[2:-2] > quiet[2:-2] + 0.2).all()
    # a burst of sound: open only around it, shut again afterwards
    burst = np.zeros(2 * SR, np.float32)
    burst[SR // 2:SR] = 0.3 * tone[:SR // 2]
    track = speech.mouth_track(burst)
    assert (track[:10] == 0).all() and (track[28:] == 0).all() and track[15:22].min() > 0.5


def test_hiss_opens_the_mouth_less_than_a_vowel_of_equal_loudness():
    rng = np.random.default_rng(0)
    t = np.arange(SR) / SR
    vowel = np.sin(2 * np.pi * 200 * t) + 0.5 * np.sin(2 * np.pi * 600 * t)
    hiss = np.diff(rng.standard_normal(SR + 1))  # high-frequency noise
    scale = lambda x: (0.1 * x / np.sqrt(np.mean(x ** 2))).astype(np.float32)
    fv, fh = speech.audio_features(scale(vowel)), speech.audio_features(scale(hiss))
    np.testing.assert_allclose(fv.loud[2:-2], fh.loud[2:-2], atol=0.05)
    assert fh.open[2:-2].mean() < 0.6 * fv.open[2:-2].mean()
    assert fh.bright[2:-2].mean() > fv.bright[2:-2].mean() + 0.3


def test_audio_framing():
    assert speech.SAMPLES_PER_FRAME == 640
    assert speech.audio_features(np.zeros(640 * 7 + 100, np.float32)).open.shape == (7,)
    with pytest.raises(ValueError, match="mono"):
        speech.audio_features(np.zeros((2, 640)))
    with pytest.raises(ValueError, match="25 fps"):
        speech.mouth_track(np.zeros(640), fps=30)
