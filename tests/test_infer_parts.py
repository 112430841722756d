"""The model-free parts of inference: chunk plan, media I/O, motion sources, settings, progress."""

import io
import json

import numpy as np
import pytest
import soundfile as sf

from avatarv_jax.inference import chunks, media, motion_source, tts
from avatarv_jax.inference.errors import InferenceInputError
from avatarv_jax.inference.progress import Progress
from avatarv_jax.inference.settings import InferenceSettings, parse_resolution


# -- chunk plan ---------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_latents,prefix", [(2, 0), (3, 1), (6, 1), (6, 2), (21, 3)])
@pytest.mark.parametrize("num_frames", [1, 2, 5, 9, 21, 22, 75, 250, 1501])
def test_chunks_cover_every_frame_once(num_frames, chunk_latents, prefix):
    plan = chunks.plan_chunks(num_frames, chunk_latents, prefix)
    covered = []
    for c in plan.chunks:
        covered.extend(range(c.frame_start, c.frame_end))
    assert covered == list(range(num_frames))           # no frame repeated or dropped
    # new latents are consecutive; every later chunk's prefix is the previous chunk's tail
    new = [g for c in plan.chunks for g in range(c.new_start, c.new_start + c.new)]
    assert new == list(range(len(new)))
    assert len(new) >= plan.num_latents
    for prev, c in zip(plan.chunks, plan.chunks[1:]):
        assert c.prefix == prefix and c.gen_start == prev.gen_start + chunk_latents - prefix
        assert c.new == chunk_latents - prefix
        assert c.audio_start == 4 * c.gen_start
    # the count follows the length: 1 + ceil((L - C) / (C - P)) chunks
    extra = max(0, plan.num_latents - chunk_latents)
    assert len(plan) == 1 + -(-extra // (chunk_latents - prefix))


def test_chunk_count_grows_with_length():
    counts = [len(chunks.plan_chunks(round(s * 25), 6, 1)) for s in (1, 10, 60)]
    assert counts == [1 + -(-(chunks.latents_for_frames(round(s * 25)) - 6) // 5)
                      for s in (1, 10, 60)]
    assert counts[0] < counts[1] < counts[2]


def test_chunk_plan_rejects_bad_sizes():
    with pytest.raises(ValueError, match="prefix_latents"):
        chunks.plan_chunks(10, 3, 3)
    with pytest.raises(ValueError, match="chunk_latents"):
        chunks.plan_chunks(10, 1, 0)


# -- settings -----------------------------------------------------------------------------------

def test_resolution_parsing():
    assert parse_resolution("480x832") == (480, 832)
    assert parse_resolution(64) == (64, 64)
    assert parse_resolution("32") == (32, 32)
    with pytest.raises(InferenceInputError, match="multiples of 16"):
        parse_resolution("100x64")
    with pytest.raises(InferenceInputError, match="expected N or HxW"):
        parse_resolution("big")


def test_settings_from_config():
    from avatarv_jax.config import get_model_config
    cfg = get_model_config("tiny")
    assert InferenceSettings.from_config(cfg).resolution == (64, 64)
    cfg.inference = dict(chunk_latents=4, prefix_latents=2)
    s = InferenceSettings.from_config(cfg)
    assert (s.chunk_latents, s.prefix_latents, s.anchor_latents) == (4, 2, 1)
    cfg.inference = dict(chunk_size=4)
    with pytest.raises(ValueError, match="chunk_size"):
        InferenceSettings.from_config(cfg)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        InferenceSettings(ref_frames=8)


# -- media --------------------------------------------------------------------------------------

def _write_video(path, colors, fps, size=(24, 40)):
    import av
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.height, s.width = size
        s.pix_fmt = "yuv444p"
        s.options = {"crf": "0", "preset": "ultrafast"}
        for color in colors:
            img = np.broadcast_to(np.asarray(color, np.uint8), size + (3,)).copy()
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.mark.parametrize("fps,expected_sources", [(50, [0, 2, 4, 6, 8]), (25, [0, 1, 2, 3, 4]),
                                                  (10, [0, 0, 1, 1, 2])])
def test_read_video_resamples_to_25_fps(tmp_path, fps, expected_sources):
    colors = [(20 * i, 255 - 20 * i, 100) for i in range(10)]
    path = tmp_path / "clip.mp4"
    _write_video(path, colors, fps)
    clip = media.read_video(path, (16, 16), max_frames=5)
    assert clip.frames.shape == (5, 16, 16, 3) and clip.frames.dtype == np.uint8
    assert clip.audio is None
    got = clip.frames[:, 8, 8].astype(int)
    want = np.asarray([colors[i] for i in expected_sources])
    assert np.abs(got - want).max() <= 6                 # RGB -> YUV -> RGB rounding


def test_read_video_counts_all_frames(tmp_path):
    path = tmp_path / "clip.mp4"
    _write_video(path, [(i * 9, 0, 0) for i in range(8)], 25)
    assert media.read_video(path, (16, 16), max_frames=100).frames.shape[0] == 8


def test_read_audio_keeps_rate_and_resamples(tmp_path):
    rate, seconds = 44100, 0.5
    t = np.arange(int(rate * seconds)) / rate
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 220 * t)], 1)
    path = tmp_path / "tone.flac"
    sf.write(path, stereo, rate)
    track = media.read_audio(path)
    assert track.rate == rate and track.layout == "stereo"
    assert track.pcm.shape == (2, stereo.shape[0])
    np.testing.assert_allclose(track.pcm[0], stereo[:, 0], atol=1e-4)
    assert abs(track.wave.size - 8000) <= 2
    # the 16 kHz mono mix carries the mean of the two tones
    spectrum = np.abs(np.fft.rfft(track.wave[:8000]))
    assert set(np.argsort(spectrum)[-2:] * 2) == {220, 440}    # 2 Hz bins
    assert spectrum[110] / spectrum[220] == pytest.approx(0.2 / 0.3, rel=0.05)


def test_mp4_writer_aborts_without_leaving_files(tmp_path):
    out = tmp_path / "out.mp4"
    track = media.AudioTrack.from_wave(np.zeros(6400, np.float32))
    with pytest.raises(RuntimeError, match="boom"):
        with media.Mp4Writer(out, height=16, width=16, audio=track) as w:
            w.write(np.zeros((3, 16, 16, 3), np.uint8))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_mp4_writer_exact_lengths(tmp_path):
    import av
    out = tmp_path / "out.mp4"
    wave = (0.2 * np.sin(np.arange(16000 * 1.3) * 0.05)).astype(np.float32)
    track = media.AudioTrack.from_wave(wave)
    with media.Mp4Writer(out, height=16, width=32, audio=track) as w:
        for n in (1, 8, 8, 8, 8):                     # 33 frames = 1.32 s
            w.write(np.full((n, 16, 32, 3), 128, np.uint8))
        w.finish()
    with av.open(str(out)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert (v.frames, v.width, v.height, v.average_rate) == (33, 32, 16, 25)
        assert a.duration * a.time_base == pytest.approx(wave.size / 16000)
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


# -- motion sources -----------------------------------------------------------------------------

def test_motion_from_sidecar_extractor_or_zero(tmp_path):
    frames = np.zeros((5, 8, 8, 3), np.uint8)
    video = tmp_path / "ref.mp4"
    none = motion_source.reference_motion(frames, video, 10)
    assert not none.available and not none.motion.any() and none.motion.shape == (5, 10)
    assert "ref.motion.npz" in none.note

    motion = np.random.default_rng(0).normal(size=(7, 10)).astype(np.float32)
    np.savez(tmp_path / "ref.motion.npz", motion=motion)
    found = motion_source.reference_motion(frames, video, 10)
    assert found.source.startswith("sidecar:") and np.array_equal(found.motion, motion[:5])

    calls = []

    def extractor(f, p):
        calls.append(p)
        return np.ones((f.shape[0], 10), np.float32)
    got = motion_source.reference_motion(frames, video, 10, extractor)
    assert got.source.startswith("extractor:") and got.motion.sum() == 50 and calls == [video]

    wrong = motion_source.reference_motion(frames, video, 10, lambda f, p: np.ones((5, 3)))
    assert not wrong.available and "(5, 3)" in wrong.note and not wrong.motion.any()

    def broken(f, p):
        raise RuntimeError("no face")
    fallback = motion_source.reference_motion(frames, video, 10, broken)
    assert fallback.source.startswith("sidecar:")     # the failing extractor falls back

    off = motion_source.reference_motion(frames, video, 10, None)
    assert not off.available and "switched off" in off.note


# -- progress, speech ---------------------------------------------------------------------------

def test_progress_counts_chunks_and_steps():
    out = io.StringIO()
    bar = Progress(3, 2, stream=out)
    for c in range(3):
        bar.start_chunk(c)
        for s in range(2):
            bar.step(s)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3                              # one line per chunk off a terminal
    assert "chunk 3/3 step 2/2" in lines[-1] and "100%" in lines[-1]
    assert bar.seconds_left() == 0


def test_tts_rejects_unknown_language_and_voice():
    if not tts.shutil.which("espeak-ng"):
        pytest.skip("espeak-ng not installed")
    with pytest.raises(InferenceInputError, match="unknown language 'xx-nope'"):
        tts.resolve_voice("xx-nope", None)
    with pytest.raises(InferenceInputError, match="unknown voice 'zz9'"):
        tts.resolve_voice("en", "zz9")
    wave = tts.synthesize("Hello.", "de", "f2")
    assert wave.dtype == np.float32 and abs(np.abs(wave).max() - 0.5) < 1e-6
    json.dumps(tts.resolve_voice("fr", "m1"))
