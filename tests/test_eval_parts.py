"""Evaluation building blocks: front ends, LSE, SyncNet I/O, baselines, report, CLI errors."""

import json
import os

import numpy as np
import pytest
import scipy.fft

from avatarv_jax.eval import baselines as bl
from avatarv_jax.eval import frontends as fe
from avatarv_jax.eval import lse, report, syncnet as sn
from avatarv_jax.eval.__main__ import main as eval_main
from avatarv_jax.io.small_weights import flatten_params, load_params


def test_mfcc_rate_and_tone_lands_in_its_mel_filter():
    t = np.arange(16000) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    m = fe.mfcc(tone, num_coeffs=26)
    assert m.shape == (100, 26)  # 100 Hz
    log_mel = scipy.fft.idct(m.astype(np.float64), type=2, axis=1, norm="ortho")
    bank = fe.mel_filterbank()
    centres = np.argmax(bank, 1) * 16000 / 512
    peak = np.argmax(log_mel[50])
    assert abs(centres[peak] - 1000) <= 120, (centres[peak], peak)
    # 13 coefficients are the first 13 of the full set
    np.testing.assert_allclose(fe.mfcc(tone), m[:, :13], rtol=1e-5, atol=1e-4)


def test_mel_filterbank_triangles():
    bank = fe.mel_filterbank(26, 512)
    assert bank.shape == (26, 257)
    np.testing.assert_allclose(bank.max(1), 1.0)
    assert (np.diff(np.argmax(bank, 1)) > 0).all()


def test_mfcc_rejects_bad_audio():
    with pytest.raises(ValueError, match="mono"):
        fe.mfcc(np.zeros((2, 100), np.float32))
    with pytest.raises(ValueError, match="16000"):
        fe.mfcc(np.zeros(1000, np.float32), sample_rate=8000)


def test_crop_is_exact_on_a_linear_ramp():
    h = w = 64
    ramp = np.tile(np.arange(w, dtype=np.float64) * 2, (h, 1))  # grey = 2x (0..126)
    frames = np.repeat(np.stack([ramp] * 3, -1)[None].astype(np.uint8), 2, 0)
    crop = fe.crop_mouths(frames, np.array([10.0, 20.0, 26.0, 36.0]), size=8)
    xs = 10 + (np.arange(8) + 0.5) * 2 - 0.5
    expected = (2 * xs) * (0.299 + 0.587 + 0.114) / 127.5 - 1
    assert crop.shape == (2, 8, 8)
    np.testing.assert_allclose(crop[0, 3], expected, atol=1e-5)


def test_mouth_boxes_from_masks_and_landmarks():
    face = np.zeros((3, 64, 64), bool)
    face[:, 10:50, 12:52] = True  # height 40
    mouth = np.zeros_like(face)
    mouth[:, 38:42, 26:38] = True  # centre (32, 40)
    box = fe.mouth_box_from_masks(mouth, face)
    np.testing.assert_allclose(box, [22, 30, 42, 50])
    with pytest.raises(ValueError, match="no mouth"):
        fe.mouth_box_from_masks(np.zeros_like(face), face)
    lm = np.zeros((2, 68, 2))
    lm[:, 48:68] = [30.0, 40.0]
    lm[:, 17:27, 1] = 10.0
    lm[:, 8, 1] = 42.0  # face height 1.25 * 32 = 40
    lm[1] = np.nan
    np.testing.assert_allclose(fe.mouth_box_from_landmarks(lm), [20, 30, 40, 50])


def test_windows_line_up():
    crops = np.arange(8)[:, None, None] * np.ones((8, 4, 4))
    vw = fe.video_windows(crops)
    assert vw.shape == (4, 4, 4, 5)
    np.testing.assert_array_equal(vw[2, 0, 0], [2, 3, 4, 5, 6])
    mf = np.arange(32)[:, None] * np.ones((32, 13))
    aw = fe.audio_windows(mf, 4)
    assert aw.shape == (4, 13, 20, 1)
    np.testing.assert_array_equal(aw[2, 0, :, 0], np.arange(8, 28))
    with pytest.raises(ValueError, match="MFCC frames"):
        fe.audio_windows(mf, 5)


def test_offset_search_finds_a_known_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(80, 16))
    for k in (-7, 0, 4, 12):
        v = np.roll(a, -k, axis=0)  # v_t = a_{t+k}
        s = lse.sync_score(v[15:65], a[15:65] if k == 0 else np.roll(v, k, 0)[15:65])
        assert s.offset == k
        assert s.lse_d < 1e-9
        assert s.lse_c > 1.0
    noise = lse.sync_score(rng.normal(size=(60, 16)), rng.normal(size=(60, 16)))
    assert noise.lse_c < 0.5 * s.lse_c
    d = lse.offset_distances(a[:40], a[:40], padding="zeros")
    assert d.shape == (31,) and np.argmin(d) == 15
    with pytest.raises(ValueError, match="too few"):
        lse.sync_score(a[:10], a[:10])
    with pytest.raises(ValueError, match="padding"):
        lse.offset_distances(a, a, padding="same")


def test_shift_audio():
    x = np.arange(640 * 5, dtype=np.float32) + 1
    y = lse.shift_audio(x, 2)
    assert (y[:1280] == 0).all() and np.array_equal(y[1280:], x[:-1280])
    z = lse.shift_audio(x, -1)
    assert np.array_equal(z[:-640], x[640:]) and (z[-640:] == 0).all()


def test_syncnet_round_trip_and_errors(tmp_path):
    model = sn.make_syncnet(seed=3)
    path = str(tmp_path / "s.safetensors")
    sn.save_syncnet(model, path, {"note": "x"}, dtype=np.float32)
    again = sn.load_syncnet(path)
    assert sn.read_meta(path) == {"note": "x"}
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 5)).astype(np.float32)
    m = np.random.default_rng(1).normal(size=(2, 13, 20, 1)).astype(np.float32)
    np.testing.assert_allclose(again.video(x), model.video(x), atol=1e-6)
    np.testing.assert_allclose(again.audio(m), model.audio(m), atol=1e-6)
    assert np.allclose(np.linalg.norm(np.asarray(model.video(x)), axis=1), 1, atol=1e-5)
    params = flatten_params(model)
    params.pop(next(iter(params)))
    with pytest.raises(ValueError, match="missing"):
        load_params(sn.make_syncnet(), params, "test")
    with pytest.raises(FileNotFoundError, match="syncnet_train"):
        sn.load_syncnet(str(tmp_path / "none.safetensors"))
    assert not [p for p in os.listdir(tmp_path) if "partial" in p]


def test_standard_config_builds_paper_sized_towers():
    cfg = sn.SyncNetConfig.standard()
    assert sn.SyncNetConfig.from_json(cfg.to_json()) == cfg
    from flax import nnx
    shapes = nnx.eval_shape(lambda: sn.SyncNet(cfg, rngs=nnx.Rngs(0)))
    assert shapes.video_tower.out.kernel.shape == (512, 1024)
    assert shapes.audio_tower.out.kernel.shape == (512, 1024)
    assert shapes.video_tower.fc.kernel.shape == (7 * 7 * 256, 512)  # 112 px / 16
    assert len(shapes.video_tower.convs) == 5 and shapes.video_tower.convs[2].kernel.shape == (
        3, 3, 256, 384)


def test_baselines():
    rng = np.random.default_rng(0)
    for n in (2, 3, 7):
        p = bl.derangement(n, rng)
        assert sorted(p) == list(range(n)) and not (p == np.arange(n)).any()
    with pytest.raises(ValueError, match="2 cases"):
        bl.derangement(1, rng)
    frames = [np.full((4, 8, 8, 3), i, np.uint8) for i in range(3)]
    audios = [np.full(640 * (4 + i), i, np.float32) for i in range(3)]
    refs = [f[0] + 10 for f in frames]
    out = bl.baseline_inputs(frames, audios, refs, seed=1)
    assert set(out) == set(bl.SYSTEMS)
    for i in range(3):
        gf, ga = out["ground_truth"][i]
        ff, fa = out["frozen_reference"][i]
        sf, sa = out["shuffled_audio"][i]
        assert gf is frames[i] and ga is audios[i]
        assert ff.shape == frames[i].shape and (ff == i + 10).all() and fa is audios[i]
        assert sf is frames[i] and sa.size == audios[i].size and (sa != i).all()


def test_bootstrap_and_markdown():
    s = report.bootstrap_ci([1.0, 2.0, 3.0, np.nan, 4.0])
    assert s["n"] == 4 and s["mean"] == 2.5 and s["ci_low"] < 2.5 < s["ci_high"]
    c = report.bootstrap_ci([0.7] * 5)
    assert c["ci_low"] == c["ci_high"] == 0.7
    assert report.bootstrap_ci([np.nan])["n"] == 0
    table = report.markdown_table(report.summarize(
        {"a": [{"lse_c": 1.0}, {"lse_c": 3.0}], "b": [{"lse_d": 2.0}]}))
    assert "| a | 2.000 [" in table and "lse_d ↓" in table and "| b | – |" in table


def test_write_report_files(tmp_path):
    per_clip = {"x": [{"case": "c0", "lse_c": 1.0, "lip_sync_corr": 0.5},
                      {"case": "c1", "lse_c": 2.0, "lip_sync_corr": 0.7}],
                "y": [{"case": "c0", "lse_c": 0.1, "lip_sync_corr": 0.0},
                      {"case": "c1", "lse_c": 0.2, "lip_sync_corr": 0.1}]}
    series = {k: [{"lse_c": [1.0, 2.0]}, {"lse_c": [1.5]}] for k in per_clip}
    out = str(tmp_path / "r")
    report.write_report(out, per_clip, series, {k: ["en", "de"] for k in per_clip})
    names = sorted(os.listdir(out))
    assert names == ["lip_sync_per_language.png", "metrics_over_time.png",
                     "per_clip_distributions.png", "report.json", "summary.md"]
    data = json.load(open(os.path.join(out, "report.json")))
    assert data["summary"]["x"]["lse_c"]["mean"] == 1.5
    with pytest.raises(FileExistsError):
        report.write_report(out, per_clip)
    assert sorted(os.listdir(tmp_path)) == ["r"]


@pytest.mark.parametrize("argv, message", [
    ([], "generated mp4s or --avatarworld"),
    (["--avatarworld", "1", "--out", "OUT"], "at least 2 cases"),
    (["--avatarworld", "2", "--seconds", "0.5", "--out", "OUT"], "at least one case"),
    (["missing_dir", "--references", "r", "--out", "OUT"], "does not exist"),
    (["--avatarworld", "2", "--generated-dir", "missing", "--out", "OUT"], "does not exist"),
])
def test_cli_bad_input_exits_2(tmp_path, capsys, argv, message):
    argv = [str(tmp_path / a) if a in ("OUT", "missing_dir", "missing") else a for a in argv]
    assert eval_main(argv) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "OUT")


def test_export_cases(tmp_path):
    import soundfile

    out = tmp_path / "cases"
    assert eval_main(["--avatarworld", "2", "--seconds", "2.4", "--resolution", "64",
                      "--export-cases", str(out)]) == 0
    assert sorted(os.listdir(out)) == [
        "case_000.png", "case_000.wav", "case_000_reference.motion.npz", "case_000_reference.mp4",
        "case_001.png", "case_001.wav", "case_001_reference.motion.npz", "case_001_reference.mp4"]
    wav, rate = soundfile.read(out / "case_001.wav")
    assert rate == 16000 and wav.shape == (60 * 640,)
    from avatarv_jax.eval import avatarworld_eval as awe
    from avatarv_jax.inference.media import read_video

    case = awe.heldout_cases(2, 2.4, 64)[1]
    clip = read_video(out / "case_001_reference.mp4", (64, 64), max_frames=100)
    want = awe.render_reference_clip(case)
    assert clip.frames.shape == want.frames.shape == (50, 64, 64, 3)
    assert want.identity_id == case.identity_id and want.scene_id == case.scene_id
    err = np.abs(clip.frames.astype(np.float32) - want.frames.astype(np.float32)).mean()
    assert err < 6, err          # H.264 at crf 18
    from avatarv_jax.inference.motion_source import reference_motion

    found = reference_motion(clip.frames, out / "case_001_reference.mp4", 10, extractor="auto")
    np.testing.assert_array_equal(found.motion, np.asarray(want.motion, np.float32))
