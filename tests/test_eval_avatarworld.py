"""AvatarWorld evaluation end to end: the CLI, the report, and where each baseline lands."""

import json
import os

import numpy as np
import pytest

from avatarv_jax.eval import avatarworld_eval as awe
from avatarv_jax.eval import syncnet as sn
from avatarv_jax.eval.__main__ import main as eval_main



@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    """3 held-out cases of 4 s at 64 px; the ground truth also handed in as 'generated' mp4s."""
    from avatarv_jax.data.avatarworld.media import write_mp4

    root = tmp_path_factory.mktemp("eval")
    gen = root / "gen"
    gen.mkdir()
    for case in awe.heldout_cases(3, 4.0, 64, seed=5):
        from avatarv_jax.data.avatarworld import make_clip
        clip = make_clip(case.seed, case.identity_id, case.scene_id, case.language,
                         duration_s=case.seconds, resolution=case.resolution)
        write_mp4(str(gen / f"{case.name}.mp4"), clip.frames, clip.audio)
    out = root / "report"
    assert eval_main(["--avatarworld", "3", "--seconds", "4", "--resolution", "64", "--seed", "5",
                      "--window", "2", "--generated-dir", str(gen), "--out", str(out)]) == 0
    return out


def test_report_files_and_structure(report_dir):
    assert sorted(os.listdir(report_dir)) == [
        "lip_sync_per_language.png", "metrics_over_time.png", "per_clip_distributions.png",
        "report.json", "summary.md"]
    rep = json.load(open(report_dir / "report.json"))
    assert list(rep["per_clip"]) == ["generated", "ground_truth", "frozen_reference",
                                     "shuffled_audio"]
    for system, rows in rep["per_clip"].items():
        assert [r["case"] for r in rows] == ["case_000", "case_001", "case_002"]
        for key in ("lse_c", "lse_d", "sync_offset", "lip_sync_corr", "face_similarity",
                    "attribute_agreement", "style_match", "lse_c_drift_slope_per_s"):
            assert key in rows[0], (system, key)
        assert all(len(s["lse_c"]) == 2 for s in rep["series"][system])  # 4 s / 2 s windows
        st = rep["summary"][system]["lse_c"]
        assert st["ci_low"] <= st["mean"] <= st["ci_high"] and st["n"] == 3
    md = open(report_dir / "summary.md").read()
    assert "| ground_truth |" in md and "lse_c ↑" in md


def test_baselines_land_where_they_should(report_dir):
    s = json.load(open(report_dir / "report.json"))["summary"]
    mean = {sys_: {k: v["mean"] for k, v in m.items()} for sys_, m in s.items()}
    gt, frozen, shuf = mean["ground_truth"], mean["frozen_reference"], mean["shuffled_audio"]
    # lip sync: ground truth best; shuffled audio worst where lips move against the wrong sound
    # (silence closure; LSE-D on the 20-case report). The frozen frame has no lip motion:
    # LSE-C and the correlation sit at their floor (~0) for it.
    assert gt["lse_c"] > max(frozen["lse_c"], shuf["lse_c"])
    assert gt["lse_d"] < min(frozen["lse_d"], shuf["lse_d"])
    assert shuf["silence_closed_fraction"] < min(gt["silence_closed_fraction"],
                                                 frozen["silence_closed_fraction"])
    assert gt["lip_sync_corr"] > 0.8 and gt["lip_sync_corr"] > shuf["lip_sync_corr"] + 0.3
    assert frozen["lip_sync_corr"] < 0.05 and frozen["lse_c"] < 0.05
    assert gt["sync_offset"] == 0.0
    # motion: the frozen frame is worst
    assert frozen["motion_std"] < 0.01 < gt["motion_std"]
    assert frozen["style_match"] < min(gt["style_match"], shuf["style_match"])
    # identity: every baseline shows the right person
    for m in (gt, frozen, shuf):
        assert m["attribute_agreement"] > 0.8 and m["face_similarity"] > 0.9
    # the ground truth through H.264 scores like the ground truth
    g = mean["generated"]
    assert g["sync_offset"] == 0.0 and g["lip_sync_corr"] > 0.8
    assert abs(g["lse_c"] - gt["lse_c"]) < 0.25 * gt["lse_c"]


def test_generated_of_wrong_size_exits_2(tmp_path, capsys):
    from avatarv_jax.data.avatarworld.media import write_mp4

    gen = tmp_path / "gen"
    gen.mkdir()
    for i in range(2):
        write_mp4(str(gen / f"case_{i:03d}.mp4"), np.zeros((60, 32, 32, 3), np.uint8),
                  np.zeros(60 * 640, np.float32))
    rc = eval_main(["--avatarworld", "2", "--seconds", "2.4", "--resolution", "64",
                    "--generated-dir", str(gen), "--out", str(tmp_path / "r")])
    assert rc == 2 and "the case is 64 px" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r")
    assert not [p for p in os.listdir(tmp_path) if "partial" in p]


def test_noise_video_is_scored_below_the_ground_truth():
    """An untrained model's output is noise: it must still score, and score low."""
    from avatarv_jax.data.avatarworld.probe import load_probe

    probe = load_probe()
    ev = awe.AvatarWorldEvaluator(probe, sn.SyncScorer(sn.load_syncnet()), window_s=1.0)
    truth = awe.render_case(awe.heldout_cases(2, 3.0, 64, seed=9)[0], probe)
    noise = np.random.default_rng(0).integers(0, 256, truth.clip.frames.shape, np.uint8)
    m, series = ev.score(truth, noise, truth.clip.audio)
    gt, _ = ev.score(truth, truth.clip.frames, truth.clip.audio)
    assert all(np.isfinite(m[k]) for k in ("lse_c", "lse_d", "lip_sync_corr", "style_match"))
    assert m["lse_c"] < 0.5 * gt["lse_c"] and m["lip_sync_corr"] < gt["lip_sync_corr"] - 0.3
    assert m["attribute_agreement"] < gt["attribute_agreement"]
    assert len(series["lse_c"]) == 3
    with pytest.raises(ValueError, match="do not match"):
        ev.score(truth, noise[:, :32, :32], truth.clip.audio)
